"""MLP lobotomy (seed 000, stage 2A): profile every MLP on the calib split, then zero the least needed.

profile_ffn  -> profile.json: per layer fire rate, Gini of neuron magnitudes, bandwidth share, and the
                ablation sensitivity (KL to the full model / perplexity) when only that MLP is zeroed.
make_lobotomy -> lobotomy.json: layers ranked by sensitivity and the cut list, grown greedily while the
                *measured* KL of the whole cut stays within budget (single-layer KLs do not add up); the
                search stops at the first layer whose own KL exceeds the budget left.
At inference the cut is a StepPlan(zero_mlp=...): those MLPs return zeros and their weights are not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ... import atomic, manifest, metrics
from ...errors import UserError
from ...hidden_cache import read_split, tokenize
from ...plan import StaticPolicy, StepPlan
from ...progress import Progress


def gini(x: np.ndarray) -> float:
    """0 = every neuron equally active, -> 1 = a few neurons carry everything."""
    x = np.sort(np.abs(x).astype(np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def _calib(model_dir: Path, corpus_dir: Path, params: dict) -> list[list[int]]:
    from transformers import AutoTokenizer

    rows = read_split(corpus_dir, "calib")[: params["texts"]]
    ids = [x for x in tokenize(AutoTokenizer.from_pretrained(str(model_dir)), [r["text"] for r in rows],
                               params["seq_len"]) if len(x) >= 2]
    if not ids:
        raise UserError(f"calib split of {corpus_dir} has no text of 2+ tokens")
    return ids


def _quality(lm, texts: list[list[int]], base: list[metrics.Reference], plan: StepPlan) -> dict[str, float]:
    return metrics.summarize([metrics.compare(lm.logits(ids, plan), b, ids) for ids, b in zip(texts, base, strict=True)])


def profile(params: dict, model_dir: Path, corpus_dir: Path, out_dir: Path) -> dict:
    """Fire rates and Gini from one pass with activation hooks; then one ablation pass per layer."""
    import torch

    from ...torch_backend import TorchLM, default_device

    manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    texts = _calib(model_dir, corpus_dir, params)
    lm = TorchLM.load(model_dir, device=default_device())
    L, inter = lm.cfg.num_hidden_layers, lm.cfg.intermediate_size
    fired, total, sq, neuron = np.zeros(L), np.zeros(L), np.zeros(L), np.zeros((L, inter))

    def observe(layer, act):  # act [1, T, inter]
        a = act[0].abs().double()
        rms = a.pow(2).mean().sqrt()
        fired[layer] += (a > params["fire_threshold"] * rms).sum().item()
        total[layer] += a.numel()
        sq[layer] += a.pow(2).sum().item()
        neuron[layer] += a.sum(0).cpu().numpy()

    base, inputs, full = [], [], []
    with torch.inference_mode():  # one forward per text: baseline log-probs and every layer's input
        for ids in texts:
            t = torch.tensor([ids], device=lm.device)
            fw = lm.forward(t, lm.new_cache(1, len(ids)), capture=set(range(L)), observe_mlp=observe)
            logits = lm.to_numpy(fw.out.logits[0])
            base.append(metrics.reference(metrics.log_softmax(logits).astype(np.float32)))
            full.append(metrics.compare(logits, base[-1], ids))
            inputs.append(fw.captured)
    full = metrics.summarize(full)
    progress = Progress("profile_ffn ablations", L, "layers")
    wb = lm.cfg.weight_bytes(1)
    per_token = wb["layers"] + wb["lm_head"]
    layers = []
    for i in range(L):  # zeroing MLP i changes nothing before layer i: each ablation resumes from its input
        plan = StepPlan(zero_mlp=frozenset({i}))
        q = metrics.summarize([metrics.compare(lm.logits(ids, plan, resume=(i, x[i])), b, ids)
                               for ids, b, x in zip(texts, base, inputs, strict=True)])
        layers.append({
            "layer": i,
            "fire_rate": fired[i] / total[i],
            "gini": gini(neuron[i]),
            "activation_rms": float(np.sqrt(sq[i] / total[i])),
            "mlp_bytes_share": wb["mlp_per_layer"] / per_token,
            "sparse_bytes_share": (1 - fired[i] / total[i]) * wb["mlp_per_layer"] / per_token,
            "kl": q["kl_to_baseline"],
            "perplexity": q["perplexity"],
            "perplexity_delta": q["perplexity"] - full["perplexity"],
            "top1_agreement": q["top1_agreement"],
        })
        progress.step()
    progress.finish(f"{len(texts)} calib texts, {full['eval_tokens']} tokens, {L} single-MLP ablations")
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "profile.json", {"baseline": full, "layers": layers})
        return manifest.write(tmp, stage="profile_ffn", inputs={"model": model_dir, "corpus": corpus_dir},
                              params=params, outputs={"calib_tokens": full["eval_tokens"],
                                                      "baseline_perplexity": full["perplexity"]})


def make(params: dict, profile_dir: Path, model_dir: Path, corpus_dir: Path, out_dir: Path) -> dict:
    """Rank layers by single-layer KL; add them in that order while the whole cut's measured KL fits."""
    import torch

    from ...torch_backend import TorchLM, default_device

    prof_m = manifest.verify(profile_dir, stage="profile_ffn")
    manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    prof = json.loads((profile_dir / "profile.json").read_text())
    ranked = sorted(prof["layers"], key=lambda r: r["kl"])
    texts = _calib(model_dir, corpus_dir, prof_m["params"])
    lm = TorchLM.load(model_dir, device=default_device())
    with torch.inference_mode():
        base = [metrics.reference(metrics.log_softmax(lm.logits(ids)).astype(np.float32)) for ids in texts]
    cut, trail, q = [], [], {"kl_to_baseline": 0.0, "perplexity": prof["baseline"]["perplexity"]}
    for row in ranked:
        if len(cut) >= params["max_layers"] or row["kl"] > params["max_kl"] - q["kl_to_baseline"]:
            break  # ranked by KL: no later layer alone fits the budget that is left
        trial = _quality(lm, texts, base, StepPlan(zero_mlp=frozenset(cut + [row["layer"]])))
        trail.append({"cut": sorted(cut + [row["layer"]]), "kl": trial["kl_to_baseline"],
                      "perplexity": trial["perplexity"], "accepted": trial["kl_to_baseline"] <= params["max_kl"]})
        if trail[-1]["accepted"]:
            cut.append(row["layer"])
            q = trial
    plan = {
        "technique": "lobotomy",
        "ranked": [{"layer": r["layer"], "kl": r["kl"], "perplexity_delta": r["perplexity_delta"]} for r in ranked],
        "cut": sorted(cut),
        "calib_kl": q["kl_to_baseline"],
        "calib_perplexity": q["perplexity"],
        "budget": params,
        "search": trail,
    }
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "lobotomy.json", plan)
        return manifest.write(tmp, stage="make_lobotomy",
                              inputs={"profile": profile_dir, "model": model_dir, "corpus": corpus_dir},
                              params=params, outputs={"cut": plan["cut"], "calib_kl": plan["calib_kl"]})


def load_plan(artifact: Path) -> StepPlan:
    manifest.verify(artifact, stage="make_lobotomy")
    try:
        cut = json.loads((artifact / "lobotomy.json").read_text())["cut"]
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt lobotomy plan in {artifact}: {e}") from None
    return StepPlan(zero_mlp=frozenset(int(i) for i in cut))


def policy(artifacts: dict[str, Path], cfg, options: dict) -> StaticPolicy:
    plan = load_plan(artifacts["lobotomy"])
    bad = [i for i in plan.zero_mlp if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise UserError(f"lobotomy plan {artifacts['lobotomy']} cuts layer {bad[0]}, model has {cfg.num_hidden_layers}")
    return StaticPolicy(plan)
