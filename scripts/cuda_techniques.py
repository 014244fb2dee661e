"""Every technique on a CUDA GPU beside the baseline, on random-weight models of LLM shapes: decode speedup
against the structural bound (adaptive_inference.bench.cuda_techniques; `--help` for the options; the pipeline
runs it as the gpu_bench stage).

    python scripts/cuda_techniques.py --shapes llama3-8b --modes compiled --configs token-router int8 --out F
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference.bench.cuda_techniques import main  # noqa: E402

if __name__ == "__main__":
    main()
