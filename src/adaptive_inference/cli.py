"""One CLI, one subcommand per pipeline stage; Snakefile and dvc.yaml call exactly these."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import UserError


def _prepare_model(a, params):
    from . import prepare_model

    return prepare_model.build(params["model"], a.out)


def _build_corpus(a, params):
    from . import corpus

    return corpus.build(params["corpus"], a.out)


def _cache_hidden(a, params):
    from . import hidden_cache

    return hidden_cache.build(params["cache_hidden"], a.model, a.corpus, a.out)


def _technique_stage(st):
    def run(a, params):
        from . import techniques

        return techniques.resolve(st.call)(params[st.section], *[getattr(a, i) for i in st.inputs], a.out)

    return run


def _benchmark(a, params):
    from .bench import job

    return job.build(params["benchmark"], a.backend, a.config, a.model, a.corpus, a.artifacts, a.out)


def _benchmark_reference(a, params):
    from .bench import job

    return job.build_reference(params["benchmark"], a.backend, a.model, a.corpus, a.out)


def _gpu_bench(a, params):
    if "gpu_bench" not in params:
        raise UserError(f"{a.params} has no gpu_bench section")
    from .bench import cuda_techniques  # imports torch: only for this stage

    return cuda_techniques.build(params["gpu_bench"], a.out)


def _report(a, params):
    from . import report

    return report.build(params["report"], a.results, a.out, artifacts=a.artifacts, gpu_runs=a.gpu_runs)


def _dvc_yaml(a, params):
    from . import dvcgen

    return dvcgen.write(params, a.out)


def _regenerate(a, params):
    from . import regenerate

    return regenerate.run(params["regenerate"], a.params.parent)


def _chat(a, params):
    from . import chat

    return chat.run(params, a.config, model_dir=a.model, artifacts_dir=a.artifacts_dir, backend=a.backend,
                    log_path=a.log, max_new_tokens=a.max_new_tokens, temperature=a.temperature)


def _paths(p: argparse.ArgumentParser, *names: str) -> None:
    for n in names:
        p.add_argument(f"--{n}", type=Path, required=True, help=f"{n} artifact folder")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adaptive-inference", description=__doc__)
    sub = ap.add_subparsers(dest="stage", required=True)

    def stage(name, fn, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params.yaml (validated)")
        p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
        p.set_defaults(fn=fn)
        return p

    stage("prepare-model", _prepare_model, "Convert model.source to a plain HF folder.")
    stage("build-corpus", _build_corpus, "Build categorized train / calib / eval texts.")
    _paths(stage("cache-hidden", _cache_hidden, "Cache hidden states of the train and calib splits."),
           "model", "corpus")
    from . import techniques

    for st in techniques.stages():
        _paths(stage(st.name, _technique_stage(st), st.help), *st.inputs)
    p = stage("benchmark", _benchmark, "Measure one configuration on one backend, paired with the baseline.")
    _paths(p, "model", "corpus")
    p.add_argument("--backend", required=True, help="a name in benchmark.backends")
    p.add_argument("--config", required=True, help="a name in benchmark.configs")
    p.add_argument("--artifacts", type=Path, nargs="*", default=[],
                   help="technique artifact folders the configuration applies")
    p = stage("benchmark-reference", _benchmark_reference,
              "Time the library's own generate against our baseline decode on one backend.")
    _paths(p, "model", "corpus")
    p.add_argument("--backend", required=True, help="a name in benchmark.backends")
    p = sub.add_parser("chat", help="Chat with a configuration applied.", description=_chat.__doc__ or
                       "Chat with a benchmark configuration applied; prints tok/s after each reply.")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--config", default="baseline", help="a name under benchmark.configs")
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    p.add_argument("--model", type=Path, default=Path("artifacts/model"))
    p.add_argument("--artifacts-dir", type=Path, default=Path("artifacts"), help="where technique artifacts are found")
    p.add_argument("--log", type=Path, help="append per-token decisions to this JSONL file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(fn=_chat)
    p = sub.add_parser("dvc-yaml", help="Write dvc.yaml from params.yaml and the technique registry.")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    p.set_defaults(fn=_dvc_yaml)
    p = sub.add_parser("regenerate", help="dvc repro, then dvc metrics diff against git; fails on a quality move.",
                       description="Run in the pipeline's folder (CI: ci/). Exit 1 when a quality metric moved "
                                   "past regenerate.tolerance.")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.set_defaults(fn=_regenerate)
    stage("gpu-bench", _gpu_bench, "On a CUDA GPU: every technique beside the baseline on random-weight models "
                                   "of LLM shapes (params gpu_bench).")
    p = stage("report", _report, "Collect benchmark results into Markdown, HTML and metrics JSON.")
    p.add_argument("--results", type=Path, nargs="+", required=True,
                   help="benchmark job folders (configurations and references)")
    p.add_argument("--artifacts", type=Path, nargs="*", default=[], help="technique artifact folders to summarize")
    p.add_argument("--gpu-runs", type=Path, nargs="*", default=[], help="gpu_bench folders for the GPU section")
    return ap


class Terminated(BaseException):
    """SIGTERM (what a scheduler sends at a time limit) as an exception, so every atomic output's cleanup
    runs on the way out and no `.<output>.tmp-*` folder is left behind."""


def _terminate(signum, frame):
    raise Terminated


def handle_sigterm() -> None:
    signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handle_sigterm()
    try:
        from . import params as params_mod

        params = params_mod.load(args.params)
        rc = args.fn(args, params)
        if isinstance(rc, int):  # a check's verdict (regenerate); stages return their manifest
            return rc
    except UserError as e:
        print(f"adaptive-inference {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        print(f"adaptive-inference {args.stage}: terminated (SIGTERM); partial outputs removed", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
