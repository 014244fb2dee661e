"""Interactive chat with a benchmark configuration applied: streams replies, prints tok/s after each,
optionally logs per-token decisions (P(rare), head used, plan) to JSONL. 'exit' or 'quit' ends it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from . import manifest, techniques
from .errors import UserError


def find_artifacts(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if (p / manifest.MANIFEST).is_file()) if Path(folder).is_dir() else []


def run(params: dict, config: str, *, model_dir: Path, artifacts_dir: Path, backend: str, log_path: Path | None,
        max_new_tokens: int, temperature: float, stdin=sys.stdin, stdout=sys.stdout) -> int:
    from transformers import AutoTokenizer

    from .benchmark import load_backend

    configs = params["benchmark"]["configs"]
    if config not in configs:
        raise UserError(f"unknown configuration {config!r} (params benchmark.configs: {', '.join(configs)})")
    names = configs[config]["techniques"]
    techniques.check({config: {"techniques": names}})
    manifest.verify(model_dir, stage="prepare_model")
    lm = load_backend(backend, model_dir, params["benchmark"]["dtype"])
    policy_for = lambda: techniques.make_policy(names, find_artifacts(artifacts_dir), lm.cfg)  # noqa: E731
    policy_for()  # fail now, not after the first question, if an artifact is missing
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stop = {*lm.cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    messages, turn = [], 0
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
            lm.head_log.clear()
            policy, out, shown, t0, steps = policy_for(), [], "", None, 0
            for step, (nxt, _) in enumerate(lm.generate_step(np.array([ids]), max_new_tokens=max_new_tokens,
                                                             policy=policy, temperature=temperature, seed=turn)):
                if step == 0:
                    t0 = time.perf_counter()
                token = int(nxt[0])
                if log:
                    p_rare, common = lm.head_log[step] if step < len(lm.head_log) else (None, None)
                    plan = policy.plan(step)
                    log.write(json.dumps({"turn": turn, "step": step, "token": token, "text": tok.decode([token]),
                                          "p_rare": p_rare,
                                          "head": None if common is None else ("common" if common else "full"),
                                          "zero_mlp": sorted(plan.zero_mlp), "skip_layers": sorted(plan.skip_layers)}) + "\n")
                if token in stop:
                    break
                out.append(token)
                steps = step
                text = tok.decode(out)
                print(text[len(shown):], end="", file=stdout, flush=True)
                shown = text
            elapsed = time.perf_counter() - t0 if t0 else 0.0
            rate = steps / elapsed if elapsed > 0 else float("nan")
            commons = [c for _, c in lm.head_log]
            head = f", common head {100 * np.mean(commons):.0f}%" if commons else ""
            print(f"\n[{len(out)} tokens, {rate:.1f} tok/s{head}]", file=stdout, flush=True)
            messages.append({"role": "assistant", "content": shown})
            turn += 1
    finally:
        if log:
            log.close()
