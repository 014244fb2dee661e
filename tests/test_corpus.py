"""build_corpus: counts, determinism, held-out splits, fields, and nothing written on error."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from adaptive_inference import corpus, manifest
from adaptive_inference.errors import UserError

PARAMS = {"seed": 0, "categories": ["math", "science", "code", "prose"],
          "train": 48, "calib": 16, "eval": 12, "max_chars": 1600}
SPLITS = ("train", "calib", "eval")


def _rows(folder, split):
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _norm(text):
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "out"
    return out, corpus.build(dict(PARAMS), out)


def test_counts_match_params_and_manifest(built):
    out, m = built
    for split in SPLITS:
        rows = _rows(out, split)
        counts = {c: sum(r["category"] == c for r in rows) for c in PARAMS["categories"]}
        assert counts == {c: PARAMS[split] for c in PARAMS["categories"]}
        assert m["outputs"]["counts"][split] == counts
        assert m["outputs"]["chars"][split] == {
            c: sum(len(r["text"]) for r in rows if r["category"] == c) for c in PARAMS["categories"]}


def test_manifest_records_hashes(built):
    out, m = built
    assert manifest.verify(out, stage="build_corpus") == m
    assert set(m["files"]) == {"train.jsonl", "calib.jsonl", "eval.jsonl"}
    assert set(m["inputs"]) == {"gsm8k", "gpqa_diamond", "pydoc_topics"}
    assert all(len(v["sha256"]) == 64 for v in m["inputs"].values())
    assert len(m["outputs"]["sources"]["code"]["sha256"]) == 64
    assert m["params"] == PARAMS


def test_splits_do_not_overlap(built):
    out, _ = built
    rows = {split: _rows(out, split) for split in SPLITS}
    every = [r for split in SPLITS for r in rows[split]]
    assert len({r["id"] for r in every}) == len(every)
    assert len({_norm(r["text"]) for r in every}) == len(every)
    # a question, a code file and a reference topic each belong to exactly one split
    owner = {}
    for split in SPLITS:
        for r in rows[split]:
            key = r.get("question") or r["source"]
            assert owner.setdefault(key, split) == split, key


def test_record_fields(built):
    out, _ = built
    for split in SPLITS:
        for r in _rows(out, split):
            assert PARAMS["max_chars"] >= len(r["text"]) >= corpus.MIN_CHARS
            assert r["id"].startswith(r["category"] + "/")
            base = {"id", "category", "source", "text"}
            if r["category"] == "math":
                assert set(r) == base | {"question", "answer"} and r["source"] == "gsm8k"
                assert re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]), r["answer"]
                assert r["text"].startswith(r["question"])
            elif r["category"] == "science":
                assert set(r) == base | {"question", "choices", "answer"}
                assert len(r["choices"]) == 4 and r["answer"] in "ABCD"
            else:
                assert set(r) == base


def test_same_seed_same_files(built, tmp_path):
    out, m = built
    again = corpus.build(dict(PARAMS), tmp_path / "again")
    assert again["files"] == m["files"]
    for split in SPLITS:
        assert (tmp_path / "again" / f"{split}.jsonl").read_bytes() == (out / f"{split}.jsonl").read_bytes()


def test_other_seed_other_split(built, tmp_path):
    out, _ = built
    params = {**PARAMS, "seed": 1, "categories": ["math", "prose"]}
    corpus.build(params, tmp_path / "seed1")
    for cat in params["categories"]:
        before = {r["id"] for r in _rows(out, "eval") if r["category"] == cat}
        after = {r["id"] for r in _rows(tmp_path / "seed1", "eval") if r["category"] == cat}
        assert before != after


def test_eval_does_not_move_when_train_grows(tmp_path):
    small = {**PARAMS, "categories": ["math", "science"]}
    corpus.build(small, tmp_path / "small")
    corpus.build({**small, "train": 100}, tmp_path / "big")
    assert _rows(tmp_path / "small", "eval") == _rows(tmp_path / "big", "eval")


def test_short_max_chars(tmp_path):
    params = {**PARAMS, "categories": ["code", "prose"], "train": 20, "calib": 5, "eval": 5, "max_chars": 400}
    corpus.build(params, tmp_path / "out")
    for split in SPLITS:
        assert all(corpus.MIN_CHARS <= len(r["text"]) <= 400 for r in _rows(tmp_path / "out", split))


def test_too_few_texts_raises_and_writes_nothing(tmp_path):
    params = {**PARAMS, "categories": ["math", "science"], "train": 190}
    with pytest.raises(UserError, match=r"'science'.*train 190 \+ calib 16 \+ eval 12"):
        corpus.build(params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
