"""scripts/gpu_checks_summary.py on a folder shaped like gpu_kernel_checks.sh's output: its tables, its reading of
Nsight Compute's text report, and the decisions it prints (or none, where a step is missing)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks_summary.py"
spec = importlib.util.spec_from_file_location("gpu_checks_summary", SCRIPT)
summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)

NCU = """==PROF== Connected to process 4242
  _w4_kernel (896, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Throughput                   %        30.12
    Compute (SM) Throughput           %        41.50
    Duration                         us        77.60
    ----------------------- ----------- ------------
    Section: Occupancy
    Registers Per Thread    register/thread          255
    Achieved Occupancy                %        11.90
    OPT   Est. Speedup: 40%
          On average, each warp of this kernel spends 12.3 cycles being stalled waiting for a scoreboard dependency
  _w4_block_kernel (1792, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Duration                         us        35.10
"""


def run(a: float, b: float) -> dict:
    return {"us": a, "bytes": 1, "share_of_bandwidth": b, "max_rel_err": 0.0}


def write(out: Path, *, gluon_us: float, pairs_us: float | None) -> None:
    out.mkdir()
    (out / "device.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\n")
    (out / "steps.txt").write_text("tests: exit 0 in 120 s (limit 180)\n")
    (out / "tests.log").write_text("....\n24 passed in 118.2s\n")
    rows = {m: {"triton_d4": run(10, 0.5), "triton_d8": run(15, 0.6), "gluon_d4": run(gluon_us, 0.55),
                "gluon_d8": run(14, 0.66)} for m in ("qkv", "o", "gate_up", "down")}
    (out / "block_gemv.json").write_text(json.dumps({"shapes": {"llama3-8b": rows}}))
    cfg = {"decode_tps": 300.0, "speedup": 1.8, "bound": 3.2, "realized_share": 0.51, "bandwidth_share": 0.5}
    (out / "techniques_gluon.json").write_text(json.dumps([{"shape": "llama3-8b", "modes": {"compiled": {
        "configs": {"baseline": {**cfg, "speedup": 1.0, "bound": 1.0, "realized_share": None}, "int4-block": cfg}}}}]))
    (out / "ncu_gate_up.txt").write_text(NCU)
    tile = [{"BLOCK_N": "32", "BLOCK_K": "256", "PAIRS": "1"}]
    b8 = {m: {"triton_d4": run(10, 0.5), "matmul_m8_d4": {**run(77.6, 0.3), "tile": tile},
              "matmul_m8_int8": run(50, 0.8)} for m in ("qkv", "gate_up")}
    if pairs_us is not None:
        for r in b8.values():
            r["matmul-pairs_m8_d4"] = {**run(pairs_us, 0.4), "tile": tile}
    (out / "block_gemv_batch8.json").write_text(json.dumps({"shapes": {"llama3-8b": b8}}))


def test_tables_and_decisions_when_gluon_and_pairs_win(tmp_path):
    write(tmp_path / "o", gluon_us=8.0, pairs_us=50.0)
    text = summary.summary(tmp_path / "o")
    assert "24 passed in 118.2s" in text and "exit 0 in 120 s" in text
    assert "summed over the matrices at both depths: triton 100.0 us, gluon 88.0 us" in text
    assert "| llama3-8b | int4-block | 300.0 | 1.800 | 3.200 | 0.51 | 0.50 |" in text
    assert "| llama3-8b | baseline | 300.0 | 1.000 | 1.000 | - | 0.50 |" in text
    assert ("- launch 0: _w4_kernel grid 896x1x1 block 128x1x1: Duration 77.60 us; DRAM Throughput 30.12 %; "
            "Compute (SM) Throughput 41.50 %; Registers Per Thread 255 register/thread; Achieved Occupancy 11.90 %") in text
    assert "being stalled waiting for a scoreboard dependency" in text
    assert "- launch 1: _w4_block_kernel grid 1792x1x1 block 128x1x1: Duration 35.10 us" in text
    assert "fp32 weights 155.2 us, bf16 pairs 100.0 us" in text and "32x256p1 / 32x256p1" in text
    nxt = text.split("## next")[1]
    assert "make it triton_block.W4_BLOCK_KERNEL's default" in nxt and "default ADAPTIVE_INFERENCE_W4_PAIRS to 1" in nxt
    assert 'STEPS="gemv batch8 techniques ncu"' in nxt  # steps.txt has only the tests' exit 0


def test_steps_cut_or_failed_are_named_for_a_second_call():
    steps = ("tests: exit 0 in 150 s (limit 200)\ngemv: exit 0 in 80 s (limit 100)\n"
             "batch8: exit 124 in 150 s (limit 150)\nncu: exit 1 in 20 s (limit 100)\n")
    assert summary.unfinished(steps) == ["batch8", "techniques", "ncu"]
    assert summary.unfinished("") == list(summary.STEPS)


def test_decisions_when_neither_wins_and_when_a_step_is_missing(tmp_path):
    write(tmp_path / "a", gluon_us=12.0, pairs_us=90.0)
    (tmp_path / "a" / "steps.txt").write_text("".join(f"{s}: exit 0 in 1 s (limit 9)\n" for s in summary.STEPS))
    nxt = summary.summary(tmp_path / "a").split("## next")[1]
    assert "Triton 4-bit block kernel stays the default" in nxt and "keep ADAPTIVE_INFERENCE_W4_PAIRS off" in nxt
    assert "did not finish" not in nxt
    write(tmp_path / "b", gluon_us=12.0, pairs_us=None)  # batch8 ran without matmul-pairs: no decision on pairs
    assert "ADAPTIVE_INFERENCE_W4_PAIRS" not in summary.summary(tmp_path / "b").split("## next")[1]
    (tmp_path / "c").mkdir()  # nothing came back
    text = summary.summary(tmp_path / "c")
    assert "(no block_gemv.json: the gemv step did not finish)" in text
    assert 'STEPS="tests gemv batch8 techniques ncu"' in text.split("## next")[1]
    assert "(no ncu_gate_up.txt: the ncu step did not finish)" in text


def test_a_missing_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a folder"):
        summary.main([str(tmp_path / "nowhere")])
    summary.main([str(tmp_path)])
    assert "## next" in capsys.readouterr().out
