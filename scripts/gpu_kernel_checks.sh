#!/usr/bin/env bash
# The CUDA kernel checks a borrowed GPU runs first, most important first, each under its own time limit so that
# one call of at most ~10 minutes brings back whatever finished: the kernels' GPU tests, the 4-bit block GEMVs
# alone (Triton beside the persistent Gluon kernel), the batch-8 matmuls, the 4-bit techniques with the faster of
# the two block kernels in the decode path, and Nsight Compute's counters of gate_up's kernels. Logs and JSON go
# to $OUT (one file a step; summary.md: their tables and what they decide, scripts/gpu_checks_summary.py, which
# also runs on the CPU machine over what came back if the call's limit cut it). STEPS picks steps (default: all;
# after tests and gemv the order depends on the gemv step: see below).
#   OUT=/tmp/k bash scripts/gpu_kernel_checks.sh
#   OUT=/tmp/k STEPS="tests gemv" bash scripts/gpu_kernel_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results are written to}"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
STEPS=${STEPS:-"tests gemv batch8 techniques ncu"}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"

step() {  # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $secs)" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}

step tests 200 python -m pytest -q -x tests/test_cuda_graphs.py \
  -k "w4_block_kernel or w8_block or packed_linear or tensor_core_4bit"
step gemv 100 python scripts/cuda_block_gemv.py --shapes llama3-8b --out "$OUT/block_gemv.json"
# the techniques with whichever 4-bit block kernel the gemv step found faster over the four matrices at both depths:
# the Gluon one on the 8B shape (would it be the default?), else the Triton default on the 14B shape
faster=$(python - "$OUT/block_gemv.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["shapes"]["llama3-8b"].values()
    us = {kn: sum(r[f"{kn}_d{d}"]["us"] for r in rows for d in (4, 8)) for kn in ("triton", "gluon")}
    print("gluon" if us["gluon"] < us["triton"] else "triton")
except (OSError, KeyError, ValueError):
    print("gluon")
PY
)
echo "techniques: $faster (from block_gemv.json)" | tee -a "$OUT/steps.txt"
techniques() {
  if [[ $faster == gluon ]]; then
    ADAPTIVE_INFERENCE_W4_BLOCK=gluon step techniques 240 python scripts/cuda_techniques.py --shapes llama3-8b \
      --modes compiled --configs int4-block gears-lag --packed int4-block nested4-block nested8-block --batches 1 \
      --repeats 3 --out "$OUT/techniques_gluon.json"
  else
    step techniques 240 python scripts/cuda_techniques.py --shapes qwen2.5-14b --modes compiled \
      --configs int4-block gears-lag --packed int4-block nested4-block nested8-block --batches 1 --repeats 3 \
      --out "$OUT/techniques_14b_triton.json"
  fi
}
# batch 8: the separate ops' matmuls alone (the tensor-core 4-bit kernel's weights made in fp32 or in bf16 pairs)
# (four tiles, the old first one and three that hold 12-20 warps an SM: 16 compiles, not the whole list's 36)
batch8() {
  step batch8 150 python scripts/cuda_block_gemv.py --shapes llama3-8b --rows 1 8 --kernels triton matmul \
    matmul-pairs --depths 4 --int8 --tc-tiles 32x256 64x128 64x64 128x64 --out "$OUT/block_gemv_batch8.json"
}
# Nsight Compute on gate_up's kernels (Triton and Gluon at 1 row, the tensor-core kernel at 8, its weights made in
# fp32 and in bf16 pairs): where their time goes
ncu_step() {
  local sections="SpeedOfLight MemoryWorkloadAnalysis Occupancy LaunchStats WarpStateStats SchedulerStats"
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | tail -n 1)
  step ncu 100 "${ncu:-ncu}" --profile-from-start off --clock-control none --log-file "$OUT/ncu_gate_up.txt" \
    $(printf -- "--section %s " $sections) python scripts/cuda_block_gemv.py --shapes llama3-8b --matrices gate_up \
    --rows 1 8 --kernels triton gluon matmul matmul-pairs --depths 4 --tc-tiles 32x256 64x128 64x64 128x64 --profile \
    --out "$OUT/block_gemv_ncu.json"
}
# after tests and gemv (~300 s) a ~10-minute call reaches the techniques (240 s) or batch8 and ncu (250 s): the
# techniques first where they would make Gluon the default (the headline numbers), else batch 8 and the counters
# (the 14B rows can wait); summary.md names the steps a second call should run
if [[ $faster == gluon ]]; then
  techniques
  batch8
  ncu_step
else
  batch8
  ncu_step
  techniques
fi
python scripts/gpu_checks_summary.py "$OUT" > "$OUT/summary.md" 2>&1  # the tables and what they decide
