"""The gears' blocks in the report: packed bytes and errors per gear; entropy thresholds, histograms per
category, separation and the prompt classifier."""

from __future__ import annotations

import json
from pathlib import Path

from ... import plots


def _tag(artifact: Path) -> str:
    from ... import manifest

    m = manifest.read(artifact)
    return f"[{m['stage']}:{m['digest'][:12]}]"


def quantize_blocks(artifact: Path) -> list[tuple]:
    q = json.loads((artifact / "quantize.json").read_text())
    read, full = q["bytes_read_per_token"], q["bytes_read_per_token"]["high"]
    rows = [[g, f"{read[g] / 2**20:.1f}", f"{read[g] / full:.3f}", f"{full / read[g]:.2f}x"] for g in ("high", "mid", "low")]
    err = [[g, p, f"{v['mean']:.4f}", f"{v['max']:.4f}"] for g, by in q["relative_error"].items() for p, v in by.items()]
    res = q["resident_bytes"]
    return [("h3", f"Packed weights {_tag(artifact)}"),
            ("p", f"Layout {q['layout']} (group {q['group_size']}), parts {', '.join(q['parts'])}: {q['matrices']} "
                  f"matrices. Held in memory with every gear resident: {res['all_gears'] / 2**20:.0f} MiB "
                  f"({res['all_gears'] / res['full']:.3f}x the full weights alone). A gear shift picks another "
                  "resident set: no copy, no quantization at run time."),
            ("table", ["gear", "MiB read per token", "share of full", "structural bound"], rows),
            ("table", ["gear", "part", "mean relative error", "max relative error"], err)]


def histogram_png(e: dict) -> bytes:

    edges = e["histogram_edges"]
    fig = plots.figure(8, 3.2)
    ax = fig.add_subplot()
    for cat, c in e["by_category"].items():
        total = max(sum(c["histogram"]), 1)
        ax.stairs([v / total for v in c["histogram"]], edges, label=f"{cat} (mean {c['mean']:.2f})")
    t = e["thresholds"]
    for name in ("low", "high"):
        ax.axvline(t[name], color="k", ls="--" if name == "low" else ":", lw=1)
    ax.set(xlabel="next-token entropy (bits)", ylabel="share of tokens",
           title=f"Entropy on calib; gear thresholds low {t['low']:.2f} / high {t['high']:.2f} bits")
    ax.legend(fontsize=8)
    return plots.png(fig)


def entropy_blocks(artifact: Path) -> list[tuple]:
    e = json.loads((artifact / "entropy.json").read_text())
    t, s, c = e["thresholds"], e["separation"], e["classifier"]
    caps = [f"{k} capped at {t[k + '_cap']:.2f}" for k in ("low", "high") if t[k + "_capped"]]
    occ = ", ".join(f"{g} {v:.0%}" for g, v in e["forecast_occupancy"].items())
    return [("h3", f"Entropy calibration {_tag(artifact)}"),
            ("p", f"{e['tokens']} calib tokens, log2 V = {e['log2_vocab']:.2f} bits. Thresholds low {t['low']:.3f}, "
                  f"high {t['high']:.3f} bits (percentile values {t['low_percentile_value']:.3f} / "
                  f"{t['high_percentile_value']:.3f}; {'; '.join(caps) or 'no cap bit'}). Separation "
                  f"{'+'.join(s['hard'])} / {'+'.join(s['trivial'])}: {s['ratio']:.2f}x (seed target > 2x). "
                  f"Gear occupancy the monitor would run on calib (teacher-forced, full-precision logits): {occ}."),
            ("img", "entropy_histogram.png", "Next-token entropy per category (calib)", histogram_png(e)),
            ("p", f"Prompt classifier (first {c['prompt_tokens']} tokens -> predicted mean entropy -> gear): R^2 "
                  f"{c['r2']:.2f} in-sample; gear agreement {c['cv_gear_agreement']:.0%} (2-fold cross-validated "
                  f"on {c['texts']} calib texts) against {c['majority_gear_agreement']:.0%} for always the most "
                  f"common gear ({c['majority_gear']}): "
                  + ("the classifier picks the first gear." if c["use"] else
                     f"it does not beat that, so every generation starts in {c['majority_gear']}."))]
