"""report stage: files, self-contained HTML, metrics equal to the inputs, bad input writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adaptive_inference import manifest, report
from adaptive_inference.errors import UserError

PARAMS = {"title": "Test report"}


def _spread(median: float) -> dict:
    vals = [median * 0.96, median, median * 1.04]
    return {"median": median, "min": vals[0], "max": vals[2], "values": vals}


def _run(backend: str, config: str, decode: float, speedup: float, kl: float, frac: float) -> dict:
    return {
        "backend": backend, "device": "cpu", "config": config, "techniques": [] if config == "baseline" else [config],
        "speed": {"prefill_tps": _spread(decode * 12), "decode_tps": _spread(decode),
                  "latency_ms": {"p50": 1000 / decode, "p95": 1100 / decode},
                  "peak_rss_mb": 900.0,
                  "batch": [{"batch_size": b, "tps": _spread(decode * b * 0.8)} for b in (1, 4, 8)]},
        "quality": {"perplexity": 12.3 + kl * 10, "kl_to_baseline": kl, "top1_agreement": 1.0 - kl,
                    "gsm8k_accuracy": 1 / 6, "gsm8k_n": 6, "eval_tokens": 12000},
        "structural": {"weight_bytes_fraction": frac, "flops_fraction": frac},
        "speedup_vs_baseline": speedup,
        "speedup_ci95": [speedup - 0.02, speedup + 0.03],
    }


def _results(two_backends: bool = True) -> dict:
    runs = [_run("torch", "baseline", 25.0, 1.0, 0.0, 1.0), _run("torch", "lobotomy", 31.0, 1.24, 0.05, 0.7)]
    res = {"model": {"name": "SmolLM2-135M-Instruct", "params": 134515008, "weight_bytes": 538060032,
                     "num_layers": 30},
           "environment": {"cpu": "Test CPU", "threads": 2, "blas": {"mlx": "openblas (faiss-cpu wheel)"}},
           "runs": runs, "references": [], "agreement": {}}
    if two_backends:
        runs += [_run("mlx", "baseline", 40.0, 1.0, 0.0, 1.0), _run("mlx", "lobotomy", 46.0, 1.15, 0.05, 0.7)]
        res["references"] = [
            {"backend": "torch", "impl": "transformers.generate", "decode_tps": _spread(13.0), "ours_over_reference": 1.9},
            {"backend": "mlx", "impl": "mlx_lm.generate", "decode_tps": _spread(36.0), "ours_over_reference": 1.1}]
        res["agreement"] = {"torch_vs_mlx_top1": 0.998, "tokens": 12000, "greedy_identical": 3, "greedy_prompts": 3}
    return res


def _artifact(tmp_path: Path, name: str, res: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(res))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    manifest.write(folder, stage="benchmark", inputs={"model": model}, params={})
    return folder


def test_report_files_and_metrics(tmp_path):
    res = _results()
    src = _artifact(tmp_path, "benchmark", res)
    out = tmp_path / "reports"
    summary = report.build(PARAMS, [src], out)
    assert summary["rows"] == 4
    for name in ("report.md", "report.html", "metrics.json", "speed_quality.png", "batch_throughput.png"):
        assert (out / name).stat().st_size > 0
        assert not (out / name).name.startswith(".")
    assert (out / "speed_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    tag = f"[bench:{manifest.read(src)['digest'][:12]}]"
    md = (out / "report.md").read_text()
    assert tag in md and tag in page and "Test report" in md
    assert manifest.read(src)["inputs"]["model"]["sha256"][:12] in md

    metrics = json.loads((out / "metrics.json").read_text())
    for run in res["runs"]:
        m = metrics[run["backend"]][run["config"]]
        assert m["decode_tps"] == run["speed"]["decode_tps"]["median"]
        assert m["prefill_tps"] == run["speed"]["prefill_tps"]["median"]
        assert m["latency_ms_p95"] == run["speed"]["latency_ms"]["p95"]
        assert m["kl_to_baseline"] == run["quality"]["kl_to_baseline"]
        assert m["gsm8k_accuracy"] == run["quality"]["gsm8k_accuracy"]
        assert m["speedup_vs_baseline"] == run["speedup_vs_baseline"]
        assert m["batch_tps_bs4"] == run["speed"]["batch"][1]["tps"]["median"]
    lob = metrics["torch"]["lobotomy"]
    assert lob["structural_bound"] == pytest.approx(1 / 0.7)
    assert lob["realized_share"] == pytest.approx(0.24 / (1 / 0.7 - 1))
    assert lob["realized_share_ci95_lo"] == pytest.approx(0.22 / (1 / 0.7 - 1))
    assert lob["speedup_over_bound"] == pytest.approx(1.24 * 0.7)
    assert "1.240× [1.220–1.270]" in md and "56% [51%–63%]" in md
    assert "realized_share" not in metrics["torch"]["baseline"]  # bound 1: undefined
    assert metrics["agreement"] == res["agreement"]
    assert metrics["reference_ratios"] == {"torch": 1.9, "mlx": 1.1}


def test_two_sources_single_backend_and_missing_fields(tmp_path):
    res = _results(two_backends=False)
    del res["references"], res["agreement"], res["runs"][1]["quality"]["gsm8k_accuracy"]
    a = _artifact(tmp_path, "bench_a", res)
    b = _artifact(tmp_path, "bench_b", _results())
    out = tmp_path / "reports"
    assert report.build(PARAMS, [a, b], out)["rows"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["torch"]) == {"baseline", "lobotomy", "baseline@bench_b", "lobotomy@bench_b"}
    assert "gsm8k_accuracy" not in metrics["torch"]["lobotomy"]
    md = (out / "report.md").read_text()
    assert "—" in md
    ref_line = next(line for line in md.splitlines() if "transformers.generate" in line)
    assert "| 25.0 [24.0–26.0] | 1.90× |" in ref_line  # ours = bench_b's own torch baseline


def _bad_missing(folder: Path) -> None:
    (folder / "results.json").unlink()


def _bad_tampered(folder: Path) -> None:
    path = folder / "results.json"
    path.write_text(path.read_text().replace("25.0", "250.0", 1))


def _bad_no_runs(folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps({"runs": []}))
    manifest.write(folder, stage="benchmark", inputs={}, params={})


def _bad_type(folder: Path) -> None:
    res = _results()
    res["runs"][2]["quality"]["perplexity"] = "high"
    (folder / "results.json").write_text(json.dumps(res))
    manifest.write(folder, stage="benchmark", inputs={}, params={})


@pytest.mark.parametrize("spoil", [_bad_missing, _bad_tampered, _bad_no_runs, _bad_type])
def test_bad_input_writes_nothing(tmp_path, spoil):
    good = _artifact(tmp_path, "good", _results())
    bad = _artifact(tmp_path, "bad", _results())
    spoil(bad)
    out = tmp_path / "reports"
    with pytest.raises(UserError) as e:
        report.build(PARAMS, [good, bad], out)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_bad_input_leaves_existing_reports(tmp_path):
    out = tmp_path / "reports"
    report.build(PARAMS, [_artifact(tmp_path, "good", _results())], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(_results()))
    manifest.write(other, stage="cache_hidden", inputs={}, params={})
    with pytest.raises(UserError, match="expected 'benchmark'"):
        report.build(PARAMS, [other], out)
    with pytest.raises(UserError):
        report.build(PARAMS, [], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_technique_artifacts_are_summarized_with_citations(tmp_path):
    bench = _artifact(tmp_path, "bench", _results())
    prof = tmp_path / "profile"
    prof.mkdir()
    layers = [{"layer": i, "kl": 0.1 * (i + 1), "perplexity_delta": 0.5, "fire_rate": 0.3, "gini": 0.2,
               "mlp_bytes_share": 0.02} for i in range(3)]
    (prof / "profile.json").write_text(json.dumps({"baseline": {}, "layers": layers}))
    pm = manifest.write(prof, stage="profile_ffn", inputs={}, params={})
    lobo = tmp_path / "lobo"
    lobo.mkdir()
    (lobo / "lobotomy.json").write_text(json.dumps({"cut": [0, 2], "calib_kl": 0.25, "calib_perplexity": 15.0,
                                                     "budget": {"max_kl": 0.3}}))
    manifest.write(lobo, stage="make_lobotomy", inputs={}, params={})
    report.build({"title": "T"}, [bench], tmp_path / "out", artifacts=[prof, lobo])
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"[profile_ffn:{pm['digest'][:12]}]" in md and "layers [0, 2] zeroed" in md
    assert (tmp_path / "out" / "ffn_profile.png").stat().st_size > 1000
    (lobo / "lobotomy.json").write_text("{}")
    with pytest.raises(UserError, match="corrupt artifact"):
        report.build({"title": "T"}, [bench], tmp_path / "out2", artifacts=[prof, lobo])
    assert not (tmp_path / "out2").exists()
