"""The lobotomy's blocks in the report: the MLP profile (table + plot) and the cut."""

from __future__ import annotations

import json
from pathlib import Path

from ... import plots

PLOT = "ffn_profile.png"


def _tag(artifact: Path) -> str:
    from ... import manifest

    m = manifest.read(artifact)
    return f"[{m['stage']}:{m['digest'][:12]}]"


def profile_blocks(artifact: Path) -> list[tuple]:
    profile = json.loads((artifact / "profile.json").read_text())["layers"]
    rows = [[r["layer"], f"{r['kl']:.3f}", f"{r['perplexity_delta']:.2f}", f"{r['fire_rate']:.1%}", f"{r['gini']:.3f}",
             f"{r['mlp_bytes_share']:.2%}"] for r in profile]
    alt = "MLP profile per layer on calib: ablation KL, fire rate, Gini"
    return [("h3", f"MLP profile {_tag(artifact)}"),
            ("table", ["layer", "ablation KL", "perplexity +", "fire rate", "Gini", "MLP bytes share"], rows),
            ("img", PLOT, alt, plot(profile))]


def cut_blocks(artifact: Path) -> list[tuple]:
    plan = json.loads((artifact / "lobotomy.json").read_text())
    return [("p", f"Lobotomy {_tag(artifact)}: MLPs of layers {plan['cut']} zeroed; whole-cut KL on calib "
                  f"{plan['calib_kl']:.3f} (budget {plan['budget']['max_kl']}), calib perplexity "
                  f"{plan['calib_perplexity']:.2f}.")]


def plot(profile: list[dict]) -> bytes:

    fig = plots.figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.set(title="MLP profile (calib)", xlabel="layer", ylabel="KL when only this MLP is zeroed")
    ax.grid(alpha=0.3)
    layers = [r["layer"] for r in profile]
    ax.bar(layers, [r["kl"] for r in profile], color="C0", alpha=0.7, label="ablation KL (left)")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(layers, [r["fire_rate"] for r in profile], "C1o-", ms=3, label="fire rate (right)")
    twin.plot(layers, [r["gini"] for r in profile], "C2s-", ms=3, label="Gini (right)")
    twin.set_ylim(0, 1)
    twin.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")
    return plots.png(fig)
