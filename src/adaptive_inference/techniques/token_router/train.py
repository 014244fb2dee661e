"""train_token_router (seed 003, DLR): a per-token keep/skip gate for every layer after the first K, trained
by distillation toward a target skip ratio, one router per target in `targets`.

Data: the hidden cache only. The residual entering layer K is cached (`layer_input.K`), and the teacher's
next-token distribution is the cached final hidden state times the LM head, computed once (its top
`teacher_topk` probabilities are kept: the KD term is the KL over them). The frozen model's layers K..L-1
run in a differentiable torch forward; the router is the only thing trained.

Gates: Gumbel-softmax straight-through. Per token and layer, keep ~ sigmoid((z + logistic noise) / tau),
hard in the forward (a token runs the layer or not) with the soft gradient. The forward is the model that
runs at inference: a token that skips layer l leaves its input unchanged there, and under `kv_policy`
'project' still writes the K/V of that input at l (later tokens attend to it: Decoder.write_kv), under
'hole' contributes no key (masked, the inference cache's hole). A skipping token still gets a "what if it
ran" output for the gradient.
Loss = KD + sparsity * mean keep probability + ratio_weight * (skip share - target)^2, the quadratic term
pulling every router to its own target (against collapse to keep-all or skip-all).

Artifact: router_<target>.safetensors per target, token_router.json (curves, calib skip rates per layer,
skip rates by token type); deterministic for identical inputs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ... import atomic, manifest
from ...errors import UserError
from ...hidden_cache import load_split
from . import analysis
from .apply import KEYS, keep_logits


def _sequences(hidden_dir: Path, split: str, k: int, seq_len: int, max_texts: int) -> dict[str, np.ndarray]:
    """Texts with at least seq_len cached tokens, truncated to seq_len: x [N, T, H], final, ids [N, T]."""
    s = load_split(hidden_dir, split, [f"layer_input.{k}", "final", "token_ids", "positions", "text_index"])
    xs, fs, ids = [], [], []
    for t in np.unique(s["text_index"]):
        rows = np.flatnonzero(s["text_index"] == t)
        rows = rows[np.argsort(s["positions"][rows])][:seq_len]
        if len(rows) == seq_len and len(xs) < max_texts:
            xs.append(s[f"layer_input.{k}"][rows])
            fs.append(s["final"][rows])
            ids.append(s["token_ids"][rows])
    if not xs:
        raise UserError(f"train_token_router: no {split} text has {seq_len} cached tokens (lower seq_len)")
    return {"x": np.stack(xs).astype(np.float32), "final": np.stack(fs).astype(np.float32), "ids": np.stack(ids)}


def teacher(final: np.ndarray, head, topk: int):
    """Top-k teacher log-probs and their ids per token, from the cached final hidden state."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(torch.from_numpy(final) @ head.T, dim=-1)
        return torch.topk(logp, topk, dim=-1)


def _frozen_forward(lm, x, gates, hard, positions, holes: bool):
    """Layers K..L-1 on x [B, T, H] with per-token gates [B, T, L-K] (straight-through values) and their
    hard 0/1 decisions (with holes: the attention mask): the final-normed hidden state."""
    import torch
    import torch.nn.functional as F

    cfg, (B, T, H) = lm.cfg, x.shape
    k0 = cfg.num_hidden_layers - gates.shape[-1]
    cos, sin = lm.rope(positions)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    eye = torch.eye(T, dtype=torch.bool)
    split = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
             cfg.num_key_value_heads * cfg.head_dim)
    for j, lw in enumerate(lm.layers[k0:]):
        kept = hard[:, :, j].bool() if holes else torch.ones(B, T, dtype=torch.bool)  # tokens with K/V here
        allowed = causal[None] & (kept[:, None, :] | eye[None])  # [B, query, key]
        bias = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], float("-inf"))
        h = F.rms_norm(x, (H,), lw.ln1, cfg.rms_norm_eps)
        q, k, v = F.linear(h, lw.wqkv, lw.bqkv).split(split, dim=-1)
        q = lm._apply_rope(q.view(B, T, -1, cfg.head_dim).transpose(1, 2), cos, sin)
        k = lm._apply_rope(k.view(B, T, -1, cfg.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, -1, cfg.head_dim).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        y = x + F.linear(att.transpose(1, 2).reshape(B, T, -1), lw.wo)
        y = y + lm.mlp(y, lw, k0 + j)
        x = x + gates[:, :, j:j + 1] * (y - x)
    return lm.final_norm(x)


def _kd(lm, out, top_lp, top_ids):
    import torch

    logq = torch.log_softmax(out @ lm.lm_head.T, dim=-1)
    return (top_lp.exp() * (top_lp - logq.gather(-1, top_ids))).sum(-1).mean()


def train_one(lm, data: dict, teach, p: dict, target: float) -> tuple[dict[str, np.ndarray], list[dict], list]:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(p["seed"])
    L, K, H = lm.cfg.num_hidden_layers, p["first_layers"], lm.cfg.hidden_size
    x_all = torch.from_numpy(data["x"])
    top_lp, top_ids = teach
    positions = torch.arange(x_all.shape[1])
    holes = p["kv_policy"] == "hole"
    # prior: the round(target * routed) layers whose skip alone costs the least KD start skipped, the
    # others kept; training then decides per token (from keep-all, 36 steps only reach random skipping)
    probe = slice(0, min(len(x_all), 8))
    ones = torch.ones(*x_all[probe].shape[:2], L - K)
    costs = []
    with torch.no_grad():
        for j in range(L - K):
            hard = ones.clone()
            hard[:, :, j] = 0
            out = _frozen_forward(lm, x_all[probe], hard, hard, positions, holes)
            costs.append(_kd(lm, out, top_lp[probe], top_ids[probe]).item())
    b2 = torch.full((L - K,), p["init_logit"])
    b2[torch.from_numpy(np.argsort(costs, kind="stable")[:round(target * (L - K))].copy())] = -p["init_logit"]
    w = {"w1": (torch.randn(p["hidden"], H, generator=g) / H**0.5).requires_grad_(),
         "b1": torch.zeros(p["hidden"], requires_grad=True),
         "w2": (torch.randn(L - K, p["hidden"], generator=g) * 0.01).requires_grad_(),
         "b2": b2.requires_grad_()}
    opt = torch.optim.Adam(w.values(), lr=p["lr"])
    curve = []
    for _ in range(p["epochs"]):
        perm = torch.randperm(len(x_all), generator=g)
        sums = np.zeros(4)
        for i in range(0, len(perm), p["batch_size"]):
            idx = perm[i:i + p["batch_size"]]
            x0 = x_all[idx]
            h = F.silu(F.linear(x0 * torch.rsqrt(x0.pow(2).mean(-1, keepdim=True) + 1e-6), w["w1"], w["b1"]))
            z = F.linear(h, w["w2"], w["b2"])  # [B, T, L - K] keep logits
            u = torch.rand(z.shape, generator=g).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((z + u.log() - (1 - u).log()) / p["tau"])
            hard = (soft > 0.5).float()
            gates = hard + soft - soft.detach()
            out = _frozen_forward(lm, x0, gates, hard.detach(), positions, holes)
            kd = _kd(lm, out, top_lp[idx], top_ids[idx])
            keep = torch.sigmoid(z)
            skip = 1 - keep.mean()
            loss = kd + p["sparsity"] * keep.mean(dim=(0, 1)).mean() + p["ratio_weight"] * (skip - target) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums += np.array([loss.item(), kd.item(), 1 - hard.mean().item(), 1]) * len(idx)
        curve.append({"loss": sums[0] / sums[3], "kd": sums[1] / sums[3], "hard_skip": sums[2] / sums[3]})
    return {k: v.detach().numpy().astype(np.float32) for k, v in w.items()}, curve, costs


def build(params: dict, hidden_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    from ...torch_backend import TorchLM

    hm = manifest.verify(hidden_dir, stage="cache_hidden")
    manifest.verify(model_dir, stage="prepare_model")
    k = params["first_layers"]
    if k not in hm["outputs"]["layer_inputs"]:
        raise UserError(f"train_token_router.first_layers {k}: the hidden cache has no layer_input.{k} "
                        f"(add {k} to cache_hidden.layer_inputs)")
    lm = TorchLM.load(model_dir)
    if not 0 < k < lm.cfg.num_hidden_layers:
        raise UserError(f"train_token_router.first_layers must be in 1..{lm.cfg.num_hidden_layers - 1}, got {k}")
    torch.manual_seed(params["seed"])
    data = _sequences(hidden_dir, "train", k, params["seq_len"], params["texts"])
    teach = teacher(data["final"].reshape(-1, lm.cfg.hidden_size), lm.lm_head, params["teacher_topk"])
    shape = data["final"].shape[:2]
    teach = (teach.values.reshape(*shape, -1), teach.indices.reshape(*shape, -1))
    calib = load_split(hidden_dir, "calib", [f"layer_input.{k}", "token_ids", "final", "next_ids"])
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    counts = np.bincount(load_split(hidden_dir, "train", ["token_ids"])["token_ids"], minlength=lm.cfg.vocab_size)
    types = analysis.token_types(calib, counts, lm.lm_head.numpy(), tok)
    routers, targets = {}, {}
    for target in params["targets"]:
        t0 = time.perf_counter()
        w, curve, costs = train_one(lm, data, teach, params, float(target))
        z = keep_logits(w, calib[f"layer_input.{k}"].astype(np.float32))
        skipped = z <= 0  # [N, L - K]
        name = f"router_{target:g}.safetensors"
        routers[name] = w
        targets[f"{target:g}"] = {
            "file": name, "curve": curve, "calib_skip": float(skipped.mean()),
            "prior_layer_kd": [None] * k + np.round(costs, 6).tolist(),
            "calib_skip_by_layer": [None] * k + skipped.mean(0).round(6).tolist(),
            "calib_skip_by_token_type": analysis.skip_by_type(skipped.mean(1), types)}
        print(f"train_token_router: target {target:g}: {time.perf_counter() - t0:.0f} s, calib skip "
              f"{skipped.mean():.3f}, final KD {curve[-1]['kd']:.4f}", file=sys.stderr, flush=True)
    result = {"first_layers": k, "num_layers": lm.cfg.num_hidden_layers, "train_tokens": int(np.prod(shape)),
              "calib_tokens": int(len(calib["token_ids"])), "token_types": analysis.type_counts(types),
              "kv_policy": params["kv_policy"],
              "targets": targets}
    with atomic.output_dir(out_dir) as tmp:
        for name, w in routers.items():
            save_file({key: np.ascontiguousarray(w[key]) for key in KEYS}, str(tmp / name))
        atomic.write_json(tmp / "token_router.json", result)
        return manifest.write(tmp, stage="train_token_router", inputs={"hidden": hidden_dir, "model": model_dir},
                              params=params, outputs={t: v["calib_skip"] for t, v in targets.items()})
