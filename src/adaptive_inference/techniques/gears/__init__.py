"""Entropy gears (seed 002, Gearbx): per-token switching between 4-bit, 8-bit and full-precision weights,
driven by the entropy of the model's own next-token distribution; and the static quantized controls."""

from .. import Stage, Technique

TECHNIQUES = [
    Technique("gears", artifacts={"quantized": "quantize", "entropy": "calibrate_entropy"},
              policy=".gears.apply:gears_policy",
              options={"window": 4, "hysteresis": 0.1, "min_duration": 4, "first": "classifier", "lag": 0}),
    Technique("quantized", artifacts={"quantized": "quantize"}, policy=".gears.apply:static_policy",
              options={"gear": "mid"}),
]
STAGES = [
    Stage("quantize", "quantize", ".gears.quantize:build",
          "Packed 8-bit and 4-bit weights of the gears (nested or separate), with bytes and round-trip errors.",
          out="quantized", inputs={"model": "model"}),
    Stage("calibrate-entropy", "calibrate_entropy", ".gears.calibrate:build",
          "Entropy thresholds of the gears from the hidden cache (calib), the prompt classifier, histograms.",
          out="entropy", inputs={"hidden": "hidden", "model": "model", "corpus": "corpus"}),
]
SUMMARIES = {"quantize": ".gears.summary:quantize_blocks", "calibrate_entropy": ".gears.summary:entropy_blocks"}
