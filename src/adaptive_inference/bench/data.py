"""What a benchmark job measures on, all from the eval split: token ids for quality, decode prompts,
GSM8K prompts, GPQA multiple-choice items, with each text's category (per-category quality, the oracle
control)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..hidden_cache import read_split
from ..model_config import ModelConfig

GSM8K_INSTRUCTION = "Solve the problem. End your reply with 'The answer is N.' where N is a number."


def gpqa_items(rows: list[dict], tok, samples: int, max_prompt_tokens: int) -> list[dict]:
    """GPQA multiple choice: the question as the prompt (its last max_prompt_tokens tokens), each option's
    text as a continuation to score by mean log-likelihood (length-normalized, as lm-eval's acc_norm)."""
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    items = []
    for r in [r for r in rows if r.get("source") == "gpqa_diamond" and r.get("choices")][:samples]:
        prompt = enc(f"Question: {r['question']}\nAnswer:")[-max_prompt_tokens:]
        items.append({"prompt": prompt, "options": [enc(" " + c) for c in r["choices"]],
                      "answer": "ABCD".index(r["answer"]), "category": r["category"]})
    return items


def prepare(params: dict, model_dir: Path, corpus_dir: Path, *, gsm8k: bool = True, gpqa: bool = True,
            all_texts: bool = True) -> dict:
    """all_texts: quality on quality.max_texts texts, else on the first quality.check_texts of them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = read_split(corpus_dir, "eval")
    q, d = params["quality"], params["decode"]
    enc = lambda t, n: tok(t, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]  # noqa: E731
    texts = rows[: q["max_texts"]] if q["max_texts"] else rows  # the split interleaves categories
    texts = texts if all_texts else texts[: q["check_texts"]]
    quality = [(ids, r["category"]) for r in texts if len(ids := enc(r["text"], q["seq_len"])) >= 2]
    prompts = [(ids, r["category"]) for r in rows if len(ids := enc(r["text"], d["prompt_tokens"])) == d["prompt_tokens"]]
    if not quality or not prompts:
        raise UserError(f"eval split has no text of {d['prompt_tokens']} tokens (benchmark.decode.prompt_tokens)")
    gsm = []
    samples = params["gsm8k"]["samples"] if gsm8k else 0
    for r in [r for r in rows if r.get("source", "").startswith("gsm8k") and "answer" in r][:samples]:
        msgs = [{"role": "user", "content": f"{r['question']}\n{GSM8K_INSTRUCTION}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        gsm.append({"prompt": list(ids), "answer": r["answer"], "category": r["category"]})
    cfg = ModelConfig.from_dir(model_dir)
    return {
        "eval": [ids for ids, _ in quality], "eval_categories": [c for _, c in quality],
        "prompts": [ids for ids, _ in prompts[: d["prompts"]]],
        "prompt_categories": [c for _, c in prompts[: d["prompts"]]],
        "batch_pool": [ids for ids, _ in prompts],
        "gsm8k": gsm,
        "gpqa": gpqa_items(rows, tok, params["gpqa"]["samples"], params["gpqa"]["max_prompt_tokens"]) if gpqa else [],
        "stop_ids": sorted({*cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}),
        "tokenizer": tok,
    }
