"""report stage: job folders in, files out; metrics equal the inputs; agreement from the jobs' argmax ids;
bad input writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adaptive_inference import manifest, report
from adaptive_inference.errors import UserError

PARAMS = {"title": "Test report"}
TOP1 = [[1, 2, 3, 4], [5, 6, 7]]


def _spread(median: float) -> dict:
    vals = [median * 0.96, median, median * 1.04]
    return {"median": median, "min": vals[0], "max": vals[2], "values": vals}


def _run(backend: str, config: str, decode: float, speedup: float, kl: float, frac: float) -> dict:
    return {
        "backend": backend, "device": "cpu", "config": config, "techniques": [] if config == "baseline" else [config],
        "speed": {"prefill_tps": _spread(decode * 12), "decode_tps": _spread(decode),
                  "baseline_decode_tps": _spread(decode / speedup),
                  "latency_ms": {"p50": 1000 / decode, "p95": 1100 / decode}, "peak_rss_mb": 900.0,
                  "batch": [{"batch_size": b, "tps": _spread(decode * b * 0.8)} for b in (1, 4, 8)]},
        "quality": {"perplexity": 12.3 + kl * 10, "kl_to_baseline": kl, "top1_agreement": 1.0 - kl,
                    "gsm8k_accuracy": 1 / 6, "gsm8k_n": 6, "eval_tokens": 12000,
                    "by_category": {"code": {"kl_to_baseline": kl * 2}, "math": {"kl_to_baseline": kl / 2}}},
        "structural": {"weight_bytes_fraction": frac, "flops_fraction": frac, "head_usage": {"full": 1.0}},
        "speedup_vs_baseline": speedup, "speedup_ci95": [speedup - 0.02, speedup + 0.03],
    }


def _job(tmp_path: Path, run: dict, top1=TOP1) -> Path:
    folder = tmp_path / run["backend"] / run["config"]
    folder.mkdir(parents=True)
    res = {"run": run, "model": {"name": "SmolLM2-135M-Instruct", "params": 134515008, "weight_bytes": 538060032,
                                 "num_layers": 30},
           "environment": {"cpu": "Test CPU", "threads": 2, "device": "cpu", "decode_matmul": f"{run['backend']} gemv"},
           "top1": top1, "greedy": [[1, 2]]}
    (folder / "results.json").write_text(json.dumps(res))
    manifest.write(folder, stage="benchmark", inputs={}, params={})
    return folder


def _reference(tmp_path: Path, backend: str, ratio: float) -> Path:
    folder = tmp_path / backend / "reference"
    folder.mkdir(parents=True)
    ref = {"backend": backend, "impl": f"{backend}-lib", "decode_tps": _spread(13.0), "ours_decode_tps": _spread(25.0),
           "paired_ours_over_reference": {"median": ratio, "ci95": [ratio - 0.1, ratio + 0.1], "pairs": 12}}
    (folder / "results.json").write_text(json.dumps({"reference": ref, "environment": {"device": "cpu"}}))
    manifest.write(folder, stage="benchmark_reference", inputs={}, params={})
    return folder


def _all(tmp_path: Path) -> list[Path]:
    return [_job(tmp_path, _run("torch", "baseline", 25.0, 1.0, 0.0, 1.0)),
            _job(tmp_path, _run("torch", "lobotomy", 31.0, 1.24, 0.05, 0.7)),
            _job(tmp_path, _run("mlx", "baseline", 40.0, 1.0, 0.0, 1.0)),
            _job(tmp_path, _run("mlx", "lobotomy", 46.0, 1.15, 0.05, 0.7), top1=[[1, 2, 3, 9], [5, 6, 7]]),
            _reference(tmp_path, "torch", 1.9), _reference(tmp_path, "mlx", 1.1)]


def test_report_files_metrics_and_agreement(tmp_path):
    out = tmp_path / "reports"
    summary = report.build(PARAMS, _all(tmp_path), out)
    assert summary["rows"] == 4
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "metrics.json", "speed_quality.png",
                                               "batch_throughput.png", "pareto.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch"]["lobotomy"]["speedup_vs_baseline"] == 1.24
    assert metrics["torch"]["lobotomy"]["structural_bound"] == pytest.approx(1 / 0.7)
    assert metrics["torch"]["lobotomy"]["realized_share"] == pytest.approx(0.24 / (1 / 0.7 - 1))
    assert metrics["reference_ratios"] == {"torch": 1.9, "mlx": 1.1}
    assert metrics["agreement_by_config"]["lobotomy"]["torch_vs_mlx_top1"] == pytest.approx(6 / 7)
    assert metrics["agreement"]["torch_vs_mlx_top1"] == 1.0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3 and not re.search(r'src="(?!data:)', html)
    md = (out / "report.md").read_text()
    assert md.index("At a glance: torch") < md.index("## Speed") and "lobotomy is the fastest at 1.240×" in md
    assert "KL code" in md
    assert "torch on cpu (Test CPU, 2 threads); decode matmuls: torch gemv" in md and "decode matmuls: mlx gemv" in md
    # no table wider than a reader's screen: speed, batch, quality and structure are separate tables
    assert all(md.index(h) < md.index(n) for h, n in (("## Speed", "### Batched decode"),
                                                      ("### Batched decode", "## Quality"),
                                                      ("## Quality", "### What the decode steps read")))
    assert max(line.count(" | ") for line in md.splitlines() if line.startswith("| backend")) <= 9


def test_single_backend_has_no_agreement(tmp_path):
    jobs = [_job(tmp_path, _run("torch", "baseline", 25.0, 1.0, 0.0, 1.0)),
            _job(tmp_path, _run("torch", "router", 26.0, 1.01, 0.2, 0.9))]
    out = tmp_path / "reports"
    report.build(PARAMS, jobs, out)
    md = (out / "report.md").read_text()
    assert "Only one backend ran" in md and "No measurable speedup (interval reaches 1.0) for: router" in md


def test_reduced_precision_baseline_states_its_cost_against_float32(tmp_path):
    base = _run("torch", "baseline", 30.0, 1.0, 0.0, 1.0)
    base["quality"]["vs_float32"] = {"kl_to_baseline": 0.0021, "top1_agreement": 0.975, "perplexity": 13.2}
    out = tmp_path / "reports"
    report.build(PARAMS, [_job(tmp_path, base), _job(tmp_path, _run("torch", "lobotomy", 31.0, 1.2, 0.05, 0.7))], out)
    metrics = json.loads((out / "metrics.json").read_text())["torch"]
    assert metrics["baseline"]["kl_to_float32"] == 0.0021 and "kl_to_float32" not in metrics["lobotomy"]
    assert "KL 0.0021 nats/token and top-1 agreement 97.5% against the same model in float32" in \
        (out / "report.md").read_text()


def _bad_missing(folder: Path) -> None:
    (folder / "results.json").unlink()


def _bad_tampered(folder: Path) -> None:
    path = folder / "results.json"
    path.write_text(path.read_text().replace("31.0", "310.0", 1))


def _bad_type(folder: Path) -> None:
    res = json.loads((folder / "results.json").read_text())
    res["run"]["quality"]["perplexity"] = "high"
    (folder / "results.json").write_text(json.dumps(res))
    manifest.write(folder, stage="benchmark", inputs={}, params={})


def _bad_stage(folder: Path) -> None:
    manifest.write(folder, stage="cache_hidden", inputs={}, params={})


@pytest.mark.parametrize("spoil", [_bad_missing, _bad_tampered, _bad_type, _bad_stage])
def test_bad_input_writes_nothing(tmp_path, spoil):
    jobs = _all(tmp_path)
    spoil(jobs[1])
    out = tmp_path / "reports"
    with pytest.raises(UserError) as e:
        report.build(PARAMS, jobs, out)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_technique_artifacts_are_summarized_with_citations(tmp_path):
    jobs = _all(tmp_path)
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
    report.build({"title": "T"}, jobs, tmp_path / "out", artifacts=[prof, lobo])
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"[profile_ffn:{pm['digest'][:12]}]" in md and "layers [0, 2] zeroed" in md
    assert (tmp_path / "out" / "ffn_profile.png").stat().st_size > 1000
    (lobo / "lobotomy.json").write_text("{}")
    with pytest.raises(UserError, match="corrupt artifact"):
        report.build({"title": "T"}, jobs, tmp_path / "out2", artifacts=[prof, lobo])
    assert not (tmp_path / "out2").exists()


def test_gpu_results_section_and_bad_gpu_file(tmp_path):
    """report.gpu_results: committed scripts/cuda_techniques.py files render as a GPU section (device, measured
    bandwidth, each configuration's speedup, bound and bandwidth share); a missing or malformed one is refused in
    one line before anything is written."""
    ROOT = Path(__file__).resolve().parents[1]
    committed = ROOT / "docs/measurements/cuda_techniques_h200_llama3-8b_compiled_2026-12-01.json"
    gears = ROOT / "docs/measurements/cuda_techniques_h200_llama3-8b_gears_separate_2026-12-01.json"
    out = tmp_path / "out"
    kernel = ROOT / "docs/measurements/cuda_techniques_h100_llama3-8b_attention_kernel_token_router_2026-12-06.json"
    paired = ROOT / "docs/measurements/cuda_techniques_h100_llama3-8b_partials_2026-12-06.json"  # batch 8 too
    stage = ROOT / "docs/measurements/cuda_techniques_h100_llama3-8b_gpu_bench_2026-12-06.json"  # stored -8.3
    report.build({**PARAMS, "gpu_results": [str(committed), str(gears), str(kernel), str(paired), str(stage)]},
                 _all(tmp_path), out)
    md = (out / "report.md").read_text()
    assert "Decode attention: one Triton kernel a layer." in md and md.count("Decode attention") == 3
    # a bound within 1% of 1 (the gate skipped almost nothing at batch 8) has no realized share
    assert "| 1230.8 | 0.970 / 1.004 (—) |" in md and "-8.32" not in md
    assert "| gears-separate (int4 44% / int8 37% / full 19%) | 222.6 | 1.166 [1.126–1.210] |" in md
    assert "On a CUDA GPU" in md and "NVIDIA H200" in md
    assert re.search(r"\| llama3-8b \| compiled \| skip-25 \| 252\.9 \| 1\.303 \[1\.300–1\.307\] \| 1\.303 \| 1\.00 \| 68% \| — \|", md)
    assert re.search(r"\| llama3-8b \| compiled \| baseline \| 194\.3 \| .* \| 1326\.5 \|", md)
    assert re.search(r"\| int8 \[triton\] \| 269\.8 \| 1\.663 \[1\.661–1\.668\] \| 1\.998 \| 0\.66 \| 66% \| 1900\.2 \| "
                     r"1\.496 / 1\.998 \(0\.50\) \|", md)
    # the 4-bit kernel of each packed set: files written before results named it ran int4 on torch's tinygemm
    assert "| int4 [tinygemm] | 300.4 |" in md
    ahead = ROOT / "docs/measurements/cuda_techniques_h100_llama3-8b_run_ahead_repeats8_2026-12-07.json"
    report.build({**PARAMS, "gpu_results": [str(ahead)]}, _all(tmp_path / "r6"), tmp_path / "out6")
    md = (tmp_path / "out6" / "report.md").read_text()
    assert "each NAME/behind row is that configuration reading each token first" in md
    assert re.search(r"\| baseline/behind \| 168\.2 \| 0\.984 \[0\.983–0\.985\] \|", md)
    newer = json.loads(paired.read_text())
    newer[0]["modes"]["compiled"]["configs"]["int4"]["kernel"] = "triton"
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    report.build({**PARAMS, "gpu_results": [str(tmp_path / "newer.json")]}, _all(tmp_path / "r5"), tmp_path / "out5")
    assert "| int4 [triton] | 300.4 |" in (tmp_path / "out5" / "report.md").read_text()
    # the pipeline's own gpu_bench folder (results.json + manifest) comes first; a tampered one is refused
    from adaptive_inference import atomic, manifest

    run = tmp_path / "gpu_bench"
    with atomic.output_dir(run) as tmp:
        (tmp / "results.json").write_bytes(paired.read_bytes())
        manifest.write(tmp, stage="gpu_bench", inputs={}, params={"enabled": True})
    report.build({**PARAMS, "gpu_results": [str(gears)]}, _all(tmp_path / "r"), tmp_path / "out3", gpu_runs=[run])
    md = (tmp_path / "out3" / "report.md").read_text()
    assert md.index("gpu_bench/results.json: llama3-8b shape") < md.index(gears.name)
    (run / "results.json").write_text("[]")
    with pytest.raises(UserError, match="does not match its manifest hash"):
        report.build({**PARAMS, "gpu_results": []}, _all(tmp_path / "r2"), tmp_path / "out4", gpu_runs=[run])
    assert not (tmp_path / "out4").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"shape": "x", "configs": {}}]))  # the older per-shape format has no 'modes'
    for path, expected in ((bad, "is neither a list of scripts/cuda_techniques.py results"),
                           (tmp_path / "missing.json", "no file")):
        with pytest.raises(UserError, match=expected):
            report.build({**PARAMS, "gpu_results": [str(path)]}, _all(tmp_path / path.stem), tmp_path / "out2")
        assert not (tmp_path / "out2").exists()


def test_gpu_benchmark_jobs_summary_renders_and_bad_ones_are_refused(tmp_path):
    """scripts/benchmark_summary.py folds the pipeline's benchmark jobs (run on a GPU) into one file; the report
    shows its quality columns; a summary without a baseline, or jobs of two runs, are refused in one line."""
    from adaptive_inference import atomic
    from adaptive_inference.bench.summary import summarize

    jobs = [_job(tmp_path / "gpu", _run("torch", "baseline", 300.0, 1.0, 0.0, 1.0)),
            _job(tmp_path / "gpu", _run("torch", "int8", 330.0, 1.1, 0.0073, 0.28))]
    for j in jobs:
        r = json.loads((j / "results.json").read_text())
        r["environment"]["gpu"], r["run"]["device"] = "NVIDIA H100 80GB HBM3", "cuda:0"
        (j / "results.json").write_text(json.dumps(r))
        manifest.write(j, stage="benchmark", inputs={}, params={"dtype": "bfloat16"})
    summary = summarize(jobs[::-1])
    assert list(summary["jobs"]) == ["baseline", "int8"] and summary["gpu"] == "NVIDIA H100 80GB HBM3"
    assert summary["jobs"]["int8"]["bound"] == pytest.approx(1 / 0.28)
    path = tmp_path / "gpu_jobs.json"
    atomic.write_json(path, summary)
    report.build({**PARAMS, "gpu_results": [str(path)]}, _all(tmp_path / "r"), tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "on NVIDIA H100 80GB HBM3 (cuda:0" in md and "benchmark.dtype bfloat16" in md
    assert re.search(r"\| int8 \| 330\.0 \| 1\.100 \[1\.080–1\.130\] \| 3\.571 \| 0\.0073 \| 99\.3% \| 12\.37 \| "
                     r"0\.17 of 6 \| — of — \|", md)
    path.write_text(json.dumps(summarize(jobs, concurrent=4)))  # jobs that shared the GPU: quality only
    report.build({**PARAMS, "gpu_results": [str(path)]}, _all(tmp_path / "r4"), tmp_path / "out4")
    md = (tmp_path / "out4" / "report.md").read_text()
    assert "4 jobs shared the GPU at a time" in md and "| 330.0 |" not in md
    assert re.search(r"\| int8 \| 3\.571 \| 0\.0073 \| 99\.3% \| 12\.37 \| 0\.17 of 6 \| — of — \|", md)
    with pytest.raises(UserError, match="concurrent jobs must be at least 1, not 0"):
        summarize(jobs, concurrent=0)
    path.write_text(json.dumps({**summary, "concurrent_jobs": "4"}))
    with pytest.raises(UserError, match="gpu_jobs.json: concurrent_jobs must be a number, got '4'"):
        report.build({**PARAMS, "gpu_results": [str(path)]}, _all(tmp_path / "r5"), tmp_path / "out5")
    assert not (tmp_path / "out5").exists()
    with pytest.raises(UserError, match="no baseline job among the folders"):
        summarize(jobs[1:])
    other = _job(tmp_path / "cpu", _run("torch", "lobotomy", 40.0, 1.04, 0.2, 0.96))
    with pytest.raises(UserError, match="another gpu/device/dtype/model/code than"):
        summarize([*jobs, other])
    r = json.loads((jobs[1] / "results.json").read_text())
    del r["run"]["structural"]
    (jobs[1] / "results.json").write_text(json.dumps(r))  # an older job's format, its manifest made anew
    manifest.write(jobs[1], stage="benchmark", inputs={}, params={"dtype": "bfloat16"})
    with pytest.raises(UserError, match="int8: not a benchmark job's results.json \\(KeyError: 'structural'\\)"):
        summarize(jobs)
    path.write_text(json.dumps({**summary, "jobs": {"int8": summary["jobs"]["int8"]}}))
    with pytest.raises(UserError, match="has no 'jobs' with a baseline"):
        report.build({**PARAMS, "gpu_results": [str(path)]}, _all(tmp_path / "r2"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_pareto_front_keeps_what_nothing_beats():
    # (gain, loss): (1.3, 0.5) is beaten by (1.4, 0.4); (1.0, 0.0) and (1.4, 0.4) and (2.0, 1.0) are not
    pts = [(1.0, 0.0), (1.3, 0.5), (1.4, 0.4), (2.0, 1.0), (1.0, 0.1), (1.4, 0.4)]
    assert report.pareto_front(pts) == [0, 2, 5, 3]  # ties stay (neither beats the other), ordered by gain
    assert report.pareto_front([]) == []


def test_report_names_the_fronts(tmp_path):
    """The report draws quality against realized speedup per backend and against structural compute, and says
    which configurations are on each front."""
    out = tmp_path / "reports"
    report.build(PARAMS, _all(tmp_path), out)
    md = (out / "report.md").read_text()
    assert "](pareto.png)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("On the Pareto front"))
    # lobotomy is faster than the baseline at some KL: both are on every front of this two-point report
    assert "torch, KL to baseline: baseline, lobotomy" in line and "mlx, top-1 agreement: baseline, lobotomy" in line
    assert "structural (all backends), KL to baseline: baseline, lobotomy" in line


def test_gpqa_same_pick_and_agreement_come_from_the_jobs(tmp_path):
    """Each job scores its own configuration: the report compares GPQA picks with the baseline job's, and takes
    the torch vs MLX agreement over the texts both scored (MLX may score only the first quality texts)."""
    base, cut = _run("torch", "baseline", 25.0, 1.0, 0.0, 1.0), _run("torch", "lobotomy", 31.0, 1.24, 0.05, 0.7)
    base["quality"] |= {"gpqa_accuracy": 0.5, "gpqa_picks": [0, 1, 2, 3], "gpqa_n": 4}
    cut["quality"] |= {"gpqa_accuracy": 0.25, "gpqa_picks": [0, 1, 3, 3], "gpqa_n": 4}
    jobs = [_job(tmp_path, base), _job(tmp_path, cut),
            _job(tmp_path, _run("mlx", "baseline", 40.0, 1.0, 0.0, 1.0), top1=TOP1[:1]),
            _job(tmp_path, _run("mlx", "lobotomy", 46.0, 1.15, 0.05, 0.7), top1=[[1, 2, 3, 9]])]
    out = tmp_path / "reports"
    report.build(PARAMS, jobs, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch"]["lobotomy"]["gpqa_same_pick"] == 0.75 and metrics["torch"]["baseline"]["gpqa_same_pick"] == 1.0
    assert "gpqa_same_pick" not in metrics["mlx"]["lobotomy"]
    assert metrics["agreement_by_config"]["lobotomy"] == {"torch_vs_mlx_top1": 0.75, "tokens": 4,
                                                          "greedy_identical": 1, "greedy_prompts": 1}
    assert "25% / 75% (n=4)" in (out / "report.md").read_text()
