"""The token router's blocks in the report: per target the skip share reached, the training curve, skip
rates per layer (plot) and by token type (table and plot)."""

from __future__ import annotations

import json
from pathlib import Path

from ... import plots


def _tag(artifact: Path) -> str:
    from ... import manifest

    m = manifest.read(artifact)
    return f"[{m['stage']}:{m['digest'][:12]}]"


def layers_png(r: dict) -> bytes:

    fig = plots.figure(8, 3)
    ax = fig.add_subplot()
    for target, t in r["targets"].items():
        rates = t["calib_skip_by_layer"]
        ax.plot([i for i, v in enumerate(rates) if v is not None], [v for v in rates if v is not None], marker=".",
                label=f"target {target} (reached {t['calib_skip']:.2f})")
    ax.axvline(r["first_layers"] - 0.5, color="k", lw=0.8, ls=":")
    ax.set(xlabel="layer", ylabel="share of calib tokens skipping it", ylim=(0, 1),
           title=f"Per-layer skip rates; layers < {r['first_layers']} always run")
    ax.legend(fontsize=8)
    return plots.png(fig)


def types_png(r: dict) -> bytes:
    """Skip share by token type, one bar per target: a per-token router skips some types more than others;
    bars of even height mean the router acts as a per-layer prior."""
    types, targets = list(r["token_types"]), list(r["targets"])
    fig = plots.figure(8, 3)
    ax = fig.add_subplot()
    width = 0.8 / max(len(targets), 1)
    for j, target in enumerate(targets):
        by = r["targets"][target]["calib_skip_by_token_type"]
        xs = [i + (j - (len(targets) - 1) / 2) * width for i, k in enumerate(types) if by[k] is not None]
        ax.bar(xs, [by[k] for k in types if by[k] is not None], width, label=f"target {target}")
    ax.set_xticks(range(len(types)), [f"{k}\n(n={r['token_types'][k]})" for k in types], fontsize=8)
    ax.set(ylabel="share of routed layers skipped", ylim=(0, 1), title="Skip share by token type (calib)")
    ax.legend(fontsize=8)
    return plots.png(fig)


def blocks(artifact: Path) -> list[tuple]:
    r = json.loads((artifact / "token_router.json").read_text())
    rows = [[t, f"{v['calib_skip']:.3f}", f"{v['curve'][0]['kd']:.4f} -> {v['curve'][-1]['kd']:.4f}",
             " -> ".join(f"{c['hard_skip']:.2f}" for c in v["curve"])] for t, v in r["targets"].items()]
    types = list(r["token_types"])
    by_type = [[t, *[("—" if v["calib_skip_by_token_type"][k] is None else f"{v['calib_skip_by_token_type'][k]:.2f}")
                     for k in types]] for t, v in r["targets"].items()]
    return [("h3", f"Token router {_tag(artifact)}"),
            ("p", f"First {r['first_layers']} of {r['num_layers']} layers always run; trained on {r['train_tokens']} "
                  f"train tokens, measured on {r['calib_tokens']} calib tokens. KV policy: {r['kv_policy']}."),
            ("table", ["target", "calib skip share", "KD (first -> last epoch)", "train skip share per epoch"], rows),
            ("img", "token_router_layers.png", "Token router: skip rate per layer (calib)", layers_png(r)),
            ("table", ["target", *[f"{k} (n={r['token_types'][k]})" for k in types]], by_type),
            ("img", "token_router_types.png", "Token router: skip share by token type (calib)", types_png(r))]
