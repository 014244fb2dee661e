"""Interactive chat with a benchmark configuration applied: streams replies, prints tok/s after each,
optionally logs per-token decisions (P(rare), head used, plan) to JSONL. 'exit' or 'quit' ends it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import manifest, techniques
from .errors import UserError


def find_artifacts(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if (p / manifest.MANIFEST).is_file()) if Path(folder).is_dir() else []


def run(params: dict, config: str, *, model_dir: Path, artifacts_dir: Path, backend: str, log_path: Path | None,
        max_new_tokens: int, temperature: float, stdin=sys.stdin, stdout=sys.stdout) -> int:
    from transformers import AutoTokenizer

    from .backends import load_backend
    from .generation import stream

    configs = params["benchmark"]["configs"]
    if config not in configs:
        raise UserError(f"unknown configuration {config!r} (params benchmark.configs: {', '.join(configs)})")
    specs = configs[config]["techniques"]
    techniques.check({config: {"techniques": specs}})
    manifest.verify(model_dir, stage="prepare_model")
    lm = load_backend(backend, model_dir, params["benchmark"]["dtype"], runtime=params["benchmark"].get("runtime"))
    folders = [Path(artifacts_dir) / f for f in techniques.artifact_folders(specs)]
    policy_for = lambda: techniques.make_policy(specs, folders, lm.cfg)  # noqa: E731
    policy_for()  # fail now, not after the first question, if an artifact is missing
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stop = {*lm.cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    messages, turn = [], 0
    names = [techniques.spec_name(s) for s in specs]
    print(f"[{config} on {backend}: {', '.join(names) or 'baseline'}; 'exit' or 'quit' ends]", file=stdout)
    try:
        while True:
            print("> ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line or line.strip() in {"exit", "quit"}:
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            out, shown, decode_s, heads = [], "", 0.0, []
            for step, s in enumerate(stream(lm, np.array([ids]), max_new_tokens=max_new_tokens, policy=policy_for(),
                                            temperature=temperature, seed=turn)):
                token = int(s.tokens[0])
                decode_s += s.seconds if step else 0.0  # the prefill is not decode time
                heads.append(s.executed.head)
                if log:
                    log.write(json.dumps(decision_row(turn, step, token, tok.decode([token]), s.executed)) + "\n")
                if token in stop:
                    break
                out.append(token)
                text = tok.decode(out)
                print(text[len(shown):], end="", file=stdout, flush=True)
                shown = text
            steps = len(heads) - 1  # decode steps after the prefill
            rate = steps / decode_s if decode_s > 0 else float("nan")
            share = {h: heads.count(h) / len(heads) for h in sorted(set(heads))} if heads else {}
            head = "" if set(share) <= {"full"} else ", heads " + ", ".join(f"{h} {v:.0%}" for h, v in share.items())
            print(f"\n[{len(out)} tokens, {rate:.1f} tok/s{head}]", file=stdout, flush=True)
            messages.append({"role": "assistant", "content": shown})
            turn += 1
    finally:
        if log:
            log.close()


def decision_row(turn: int, step: int, token: int, text: str, executed) -> dict:
    """One line of the decision log: what ran for this token (layers, MLPs, weights, head) and the
    techniques' own facts (e.g. P(rare), a category and its confidence)."""
    info = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in executed.info.items()}
    return {"turn": turn, "step": step, "token": token, "text": text, "head": executed.head,
            "weights": executed.weights, "layers_run": sorted(executed.layers_run),
            "mlps_run": sorted(executed.mlps_run), "zero_mlp": sorted(executed.layers_run - executed.mlps_run), **info}
