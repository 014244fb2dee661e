"""cache_hidden: hidden states of the train and calib splits, computed once, read by every router stage.

Per split, shards `{split}-{k:03d}.safetensors` hold flat per-token rows (padding dropped):
  token_ids, positions, text_index, next_ids (-1 at a text's end), model_argmax  [N] int32
  final [N, hidden]                 final normed hidden state (the LM head's input)
  layer_input.{i} [N, hidden]       residual stream entering layer i (early layer + params' list)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from . import atomic, manifest
from .errors import UserError
from .progress import Progress

SPLITS = ("train", "calib")
SHARD_TOKENS = 16384


def read_split(corpus_dir: Path, split: str) -> list[dict]:
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"corpus has no {split}.jsonl: {corpus_dir}")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt corpus file {path}: line {e.lineno}") from None
    if not rows:
        raise UserError(f"corpus split is empty: {path}")
    return rows


def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
    return [x for x in ids]


def resolve_layers(params: dict, num_layers: int) -> tuple[int, list[int]]:
    early = num_layers // 3 if params["early_layer"] == -1 else params["early_layer"]
    layers = sorted({early, *params["layer_inputs"]})
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise UserError(f"cache_hidden: layer {bad[0]} out of range (model has {num_layers} layers)")
    return early, layers


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    # sort by length so right-padding wastes little; causal attention makes padding harmless
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _store(dtype: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32}[dtype]


def cache_split(lm, token_lists: list[list[int]], layers: list[int], batch_size: int, dtype: str,
                out: Path, split: str) -> dict:
    """Forward every text once, write shards, return counts and timing."""
    import torch
    from safetensors.torch import save_file

    store = _store(dtype)
    pad = 0
    shard: dict[str, list] = {}
    n_shards, n_tokens, t_forward = 0, 0, 0.0

    def flush():
        nonlocal n_shards, shard
        if shard:
            tensors = {k: torch.cat(v).contiguous() for k, v in shard.items()}
            save_file(tensors, str(out / f"{split}-{n_shards:03d}.safetensors"))
            n_shards += 1
            shard = {}

    progress = Progress(f"cache_hidden {split}", sum(map(len, token_lists)), "tokens")
    for batch in _batches([len(t) for t in token_lists], batch_size):
        seqs = [token_lists[i] for i in batch]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = lm.new_cache(len(seqs), T)
            final, captured = lm.hidden(ids.to(lm.device), cache, capture=set(layers))
            argmax = torch.nn.functional.linear(final, lm.lm_head).argmax(-1)
        t_forward += time.perf_counter() - t0
        for r, s in enumerate(seqs):
            n = len(s)
            nxt = torch.full((n,), -1, dtype=torch.int32)
            nxt[:-1] = torch.tensor(s[1:], dtype=torch.int32)
            rows = {
                "token_ids": torch.tensor(s, dtype=torch.int32),
                "positions": torch.arange(n, dtype=torch.int32),
                "text_index": torch.full((n,), batch[r], dtype=torch.int32),
                "next_ids": nxt,
                "model_argmax": argmax[r, :n].to("cpu", torch.int32),
                "final": final[r, :n].to("cpu", store),
                **{f"layer_input.{i}": captured[i][r, :n].to("cpu", store) for i in layers},
            }
            for k, v in rows.items():
                shard.setdefault(k, []).append(v)
            n_tokens += n
        progress.step(sum(map(len, seqs)))
        if sum(len(v) for v in shard["token_ids"]) >= SHARD_TOKENS:
            flush()
    flush()
    progress.finish(f"{len(token_lists)} texts, {n_tokens} tokens, {n_shards} shards, "
                    f"{n_tokens / t_forward:.0f} tok/s forward")
    return {"texts": len(token_lists), "tokens": n_tokens, "shards": n_shards}


def plain_forward_tps(lm, token_lists: list[list[int]], batch_size: int, max_batches: int = 2) -> float:
    """Tokens/s of a plain batched logits forward on the same batches (the cost the cache is measured against)."""
    import torch

    tokens, elapsed = 0, 0.0
    for batch in _batches([len(t) for t in token_lists], batch_size)[:max_batches]:
        seqs = [token_lists[i] for i in batch]
        T = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.forward(ids.to(lm.device), lm.new_cache(len(seqs), T))
        elapsed += time.perf_counter() - t0
        tokens += sum(len(s) for s in seqs)
    return round(tokens / elapsed, 1)


def build(params: dict, model_dir: Path, corpus_dir: Path, out_dir: Path) -> dict:
    """Cache hidden states of the train and calib splits with the torch backend."""
    from transformers import AutoTokenizer

    from .torch_backend import TorchLM, default_device

    manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    splits = {s: read_split(corpus_dir, s) for s in SPLITS}
    lm = TorchLM.load(model_dir, device=default_device(), dtype="float32")
    early, layers = resolve_layers(params, lm.cfg.num_hidden_layers)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stats = {}
    with atomic.output_dir(out_dir) as tmp:
        for split, rows in splits.items():
            ids = tokenize(tok, [r["text"] for r in rows], params["seq_len"])
            stats[split] = cache_split(lm, ids, layers, params["batch_size"], params["dtype"], tmp, split)
            stats[split]["categories"] = sorted({r["category"] for r in rows})
        ids = tokenize(tok, [r["text"] for r in splits["calib"]], params["seq_len"])
        plain = plain_forward_tps(lm, ids, params["batch_size"])
        print(f"cache_hidden: a plain batched logits forward runs {plain} tok/s on {lm.device} (the cost the "
              "cache is measured against)", file=sys.stderr, flush=True)
        return manifest.write(
            tmp, stage="cache_hidden", inputs={"model": model_dir, "corpus": corpus_dir}, params=params,
            outputs={"splits": stats, "early_layer": early, "layer_inputs": layers,
                     "hidden_size": lm.cfg.hidden_size, "vocab_size": lm.cfg.vocab_size,
                     "text_order": {s: [r["id"] for r in rows] for s, rows in splits.items()}},
        )


def load_split(cache_dir: Path, split: str, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """Concatenate a split's shards (optionally only `keys`) as numpy arrays."""
    from safetensors.numpy import load_file

    m = manifest.verify(cache_dir, stage="cache_hidden")
    files = sorted(Path(cache_dir).glob(f"{split}-*.safetensors"))
    if not files or split not in m["outputs"]["splits"]:
        raise UserError(f"hidden cache has no {split} split: {cache_dir}")
    parts = [load_file(str(f)) for f in files]
    keys = keys or list(parts[0])
    missing = [k for k in keys if k not in parts[0]]
    if missing:
        raise UserError(f"hidden cache {cache_dir} has no {missing[0]!r} (check cache_hidden.layer_inputs)")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
