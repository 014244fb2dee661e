"""Deterministic stages give byte-identical folders for identical inputs, params and code, wherever they run:
no time, host, path or wall time in what DVC and Snakemake hash."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import tiny_stage_inputs

from adaptive_inference import manifest
from adaptive_inference.techniques.gears import quantize
from adaptive_inference.techniques.lobotomy import stages as lobotomy

CORPUS = {"seed": 0, "categories": ["code", "prose"], "train": 1, "calib": 3, "eval": 1, "max_chars": 300}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _inputs(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True)
    tiny_stage_inputs(root, CORPUS)
    return root / "model", root / "corpus"


def test_stages_are_byte_identical_in_two_places(tmp_path):
    a, b = tmp_path / "checkout-a" / "deep", tmp_path / "elsewhere"
    model_a, corpus_a = _inputs(a)
    shutil.copytree(a, b)  # the same inputs at another path
    for root, model, corp in ((a, model_a, corpus_a), (b, b / "model", b / "corpus")):
        lobotomy.profile({"texts": 3, "seq_len": 16, "fire_threshold": 0.5}, model, corp, root / "profile")
        lobotomy.make({"max_layers": 1, "max_kl": 10.0}, root / "profile", model, corp, root / "lobotomy")
        quantize.build({"layout": "nested", "group_size": 32, "parts": ["mlp", "head"]}, model, root / "quantized")
    for stage in ("model", "corpus", "profile", "lobotomy", "quantized"):
        assert folder_bytes(a / stage) == folder_bytes(b / stage), stage
    text = (a / "lobotomy" / manifest.MANIFEST).read_text()
    assert str(tmp_path) not in text and "created" not in text


def test_prepare_model_tiny_is_byte_identical_in_two_processes(tmp_path):
    """model.source tiny (the CI configuration's model) from two fresh processes: same bytes (a set's order
    once leaked into the tokenizer's vocabulary and changed every downstream number)."""
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("adaptive-inference")
    params = Path(__file__).resolve().parents[1] / "ci" / "params.yaml"
    for out in ("a", "b"):
        subprocess.run([str(cli), "prepare-model", "--params", str(params), "--out", str(tmp_path / out)],
                       check=True, capture_output=True)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
