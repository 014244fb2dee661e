"""One tiny end-to-end run: snakemake builds the report; a rerun is a no-op; dvc repro reruns only
benchmark and report after a benchmark param changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEXT = ("def add(a, b):\n    return a + b\n"
        "The answer is 42. Janet has 3 eggs and buys 4 more, so she has 7 eggs.\n"
        "Light scatters off molecules; shorter wavelengths scatter more.\n")
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(path: Path) -> None:
    """A 128-entry byte-level BPE trained here, so the tiny model needs no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100])
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT
    fast.save_pretrained(path)


TINY_CONFIGS = ("baseline", "router", "lobotomy", "stacked", "map-hard-25", "gears", "token-35")


def tiny_params(model_dir: Path) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"]["source"] = str(model_dir)
    p["corpus"].update(train=3, calib=2, eval=2, max_chars=400)
    p["cache_hidden"].update(seq_len=32, batch_size=4, layer_inputs=[0, 2])
    p["train_vocab_router"].update(coverage=0.8, hidden=16, epochs=2)
    p["profile_ffn"].update(texts=4, seq_len=16)
    p["make_lobotomy"].update(max_layers=1, max_kl=10.0)
    p["build_layer_map"].update(window=8, k=3)
    p["layer_importance"].update(texts_per_category=1, seq_len=16, budgets=[0.25], tries=1)
    p["calibrate_entropy"].update(prompt_tokens=8)
    p["train_token_router"].update(first_layers=2, targets=[0.35], hidden=8, texts=4, seq_len=16, epochs=1)
    p["benchmark"]["configs"] = {k: v for k, v in p["benchmark"]["configs"].items() if k in TINY_CONFIGS}
    p["benchmark"]["configs"]["gears"]["backends"] = ["torch", "mlx"]  # cover the packed MLX path end to end
    p["benchmark"].update(
        quality={"seq_len": 32, "max_texts": 4},
        decode={"prompts": 2, "prompt_tokens": 8, "new_tokens": 4, "warmup": 0, "repeats": 2},
        batch={"sizes": [1, 2], "new_tokens": 2, "repeats": 1},
        gsm8k={"samples": 1, "max_new_tokens": 4, "backends": ["torch"]},
        gpqa={"samples": 1, "max_prompt_tokens": 12, "backends": ["torch"]},
    )
    return p


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    logs = "".join(f.read_text() for f in sorted((cwd / "logs").glob("*.log"))) if (cwd / "logs").exists() else ""
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{logs[-3000:]}"
    return res.stdout + res.stderr


def ran_stages(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def edit_params(work: Path, change) -> None:
    p = yaml.safe_load((work / "params.yaml").read_text())
    change(p)
    (work / "params.yaml").write_text(yaml.safe_dump(p))


@pytest.mark.pipeline
def test_tiny_pipeline_snakemake_then_dvc(tmp_path):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    make_tiny_model(model_dir, "llama")
    tiny_tokenizer(model_dir)
    work = tmp_path / "project"
    work.mkdir()
    for name in ("Snakefile", "workflow", "src"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir)))
    run(["adaptive-inference", "dvc-yaml"], work)

    run(["snakemake", "--cores", "2"], work)
    metrics = json.loads((work / "reports/metrics.json").read_text())
    for backend in ("torch", "mlx"):
        assert set(metrics[backend]) == set(TINY_CONFIGS)
        assert metrics[backend]["map-hard-25"]["weight_bytes_fraction"] < 1
        gears = json.loads((work / f"artifacts/benchmark/{backend}/gears/results.json").read_text())["run"]
        assert sum(gears["structural"]["weights_usage"].values()) == pytest.approx(1)
        assert set(gears["structural"]["relative_bytes"]) <= {"low", "mid"}  # packed sets load on first use
        assert 0 < gears["speed"]["bandwidth"]["share_of_limit"] and gears["speed"]["bandwidth"]["read_gbs"] > 0
        assert metrics[backend]["baseline"]["kl_to_baseline"] == 0.0
        assert metrics[backend]["lobotomy"]["kl_to_baseline"] > 0
        assert metrics[backend]["lobotomy"]["weight_bytes_fraction"] < 1
    assert metrics["agreement"]["torch_vs_mlx_top1"] > 0.99
    assert set(metrics["reference_ratios"]) == {"torch", "mlx"}
    assert "data:image/png;base64" in (work / "reports/report.html").read_text()
    assert "Nothing to be done" in run(["snakemake", "--cores", "2"], work)

    run(["git", "init", "-q"], work)
    run(["dvc", "init", "-q"], work)
    run(["dvc", "commit", "-f", "-q"], work)  # adopt what snakemake built
    assert not ran_stages(run(["dvc", "repro"], work))  # no-op

    jobs = lambda *cfgs: {f"benchmark-{b}-{c}" for b in ("torch", "mlx") for c in cfgs}  # noqa: E731
    edit_params(work, lambda p: p["make_lobotomy"].update(max_kl=9.0))  # a technique key
    assert ran_stages(run(["dvc", "repro"], work)) == {"make_lobotomy", "report"} | jobs("lobotomy", "stacked")
    edit_params(work, lambda p: p["benchmark"]["batch"].update(new_tokens=3))  # a benchmark key
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"} | jobs(*TINY_CONFIGS)
    edit_params(work, lambda p: p["report"].update(title="Tiny"))  # a report key
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"}
    edit_params(work, lambda p: p["benchmark"]["configs"].update(cut={"techniques": ["lobotomy"]}))  # a configuration
    run(["adaptive-inference", "dvc-yaml"], work)
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"} | jobs("cut")
