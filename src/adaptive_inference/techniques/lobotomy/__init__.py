"""MLP lobotomy (seed 000, stage 2A): profile every MLP on the calib split, then zero the least needed."""

from .. import Stage, Technique

TECHNIQUES = [Technique("lobotomy", artifacts={"lobotomy": "make_lobotomy"}, policy=".lobotomy.stages:policy")]
STAGES = [
    Stage("profile-ffn", "profile_ffn", ".lobotomy.stages:profile",
          "Profile every MLP on the calib split (fire rate, Gini, ablation KL).", out="profile_ffn",
          inputs={"model": "model", "corpus": "corpus"}),
    Stage("make-lobotomy", "make_lobotomy", ".lobotomy.stages:make",
          "Choose the MLPs to zero under the make_lobotomy budget.", out="lobotomy",
          inputs={"profile": "profile_ffn", "model": "model", "corpus": "corpus"}),
]
SUMMARIES = {"profile_ffn": ".lobotomy.summary:profile_blocks", "make_lobotomy": ".lobotomy.summary:cut_blocks"}
