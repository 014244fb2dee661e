"""report: benchmark job folders -> report.md, one self-contained report.html, metrics.json and plots.

It opens with what a reader came for: per backend, each configuration's speedup (with its interval)
against its quality loss, and a plain reading. Detail tables, the library references, torch-vs-MLX
agreement (computed here from the jobs' teacher-forced argmax ids), technique artifacts and provenance
follow. Every number cites the job that measured it as [bench:<first 12 hex of its manifest digest>].
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from . import atomic, manifest, plots, techniques
from .bench.stats import realized_share
from .errors import UserError

RESULTS = "results.json"
DASH = "—"
PLOTS = {"speed_quality.png": "Speedup (95% interval) against KL to the baseline, one panel per backend",
         "pareto.png": "Pareto fronts: quality (KL, top-1 agreement) against the realized decode speedup per backend "
                       "and against the structural compute saving (1 / FLOPs share); filled points are on the front",
         "batch_throughput.png": "Batched greedy decode throughput (median, bars = min–max)"}
_FIELDS = {  # metrics.json key -> path inside one run
    "decode_tps": ("speed", "decode_tps", "median"),
    "baseline_decode_tps": ("speed", "baseline_decode_tps", "median"),
    "prefill_tps": ("speed", "prefill_tps", "median"),
    "latency_ms_p50": ("speed", "latency_ms", "p50"),
    "latency_ms_p95": ("speed", "latency_ms", "p95"),
    "peak_rss_mb": ("speed", "peak_rss_mb"),
    "perplexity": ("quality", "perplexity"),
    "kl_to_baseline": ("quality", "kl_to_baseline"),
    "top1_agreement": ("quality", "top1_agreement"),
    "kl_to_float32": ("quality", "vs_float32", "kl_to_baseline"),  # baseline jobs of a bf16 / fp16 run
    "top1_to_float32": ("quality", "vs_float32", "top1_agreement"),
    "gsm8k_accuracy": ("quality", "gsm8k_accuracy"),
    "gsm8k_n": ("quality", "gsm8k_n"),
    "gpqa_accuracy": ("quality", "gpqa_accuracy"),
    "gpqa_n": ("quality", "gpqa_n"),
    "eval_tokens": ("quality", "eval_tokens"),
    "weight_bytes_fraction": ("structural", "weight_bytes_fraction"),
    "flops_fraction": ("structural", "flops_fraction"),
    "speedup_vs_baseline": ("speedup_vs_baseline",),
    "speedup_ci95_lo": ("speedup_ci95", 0),
    "speedup_ci95_hi": ("speedup_ci95", 1),
    "common_head_rate": ("speed", "common_head_rate"),
    "read_gbs": ("speed", "bandwidth", "read_gbs"),
    "bandwidth_limit_tps": ("speed", "bandwidth", "limit_tps"),
    "bandwidth_share": ("speed", "bandwidth", "share_of_limit"),
}
HOW_TO_READ = (
    "Speedup is the baseline's decode time per token over the configuration's, paired: in each job the "
    "configuration and the baseline decode the same prompts side by side, a token each in turn, and the "
    "speedup is the median of the per-prompt ratios with [lo–hi] its 95% bootstrap interval. The structural "
    "bound is 1 / (share of weight bytes a decode step still reads), what a purely memory-bound decoder would "
    "gain; realized share = (speedup − 1) / (bound − 1) is the part of that saving that showed up. KL and "
    "top-1 agreement compare each configuration's next-token distribution with the baseline of its backend "
    "on held-out eval text, so baselines read 0 and 100%. Decode speeds are tokens per second (median of the "
    "repeats, [min–max]). The bandwidth limit is the machine's read bandwidth, measured in the same job right before "
    "each timed decode pair (timed sums of a 512 MB buffer), over the weight bytes a decode step of that configuration "
    "reads: the tok/s a decoder that only streamed its weights would reach then; the share (median over pairs) says "
    "how close the configuration gets. A shared VM's bandwidth switches between states within seconds, so each "
    "pair is held against its own sample.")
_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12.5px}"
        "th,td{border:1px solid #ccc;padding:3px 7px}th{background:#f2f2f2;white-space:nowrap}"
        "td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
        "tr:nth-child(even){background:#fafafa}figure{display:inline-block;margin:0 1em 1em 0;"
        "max-width:calc(50% - 1em)}figure.wide{max-width:100%}img{max-width:100%}"
        "figcaption{font-size:12px;color:#555}p.lead{font-size:15px}")


def build(params: dict, results_dirs: list[Path], out_dir: Path, artifacts: list[Path] = (),
          gpu_runs: list[Path] = ()) -> dict:
    """Validate every job folder (and technique artifact, gpu_bench folder), render everything in memory, then
    write. The GPU section: this pipeline's gpu_bench runs first, then the committed report.gpu_results."""
    if not results_dirs:
        raise UserError("report needs at least one benchmark job folder")
    sources = [_load(Path(d)) for d in results_dirs]
    rows = _rows(sources)
    if not rows:
        raise UserError("report: no configuration job among --results (only references)")
    refs = [s for s in sources if s["kind"] == "reference"]
    agreement = _agreement(rows)
    tech = [b for a in artifacts for b in techniques.summaries(Path(a))]
    runs = [Path(d) / "results.json" for d in gpu_runs if manifest.verify(d, stage="gpu_bench")]
    gpu = _gpu_blocks(runs + [Path(f) for f in params.get("gpu_results", [])])
    files = {"speed_quality.png": _plot_speed_quality(rows), "batch_throughput.png": _plot_batch(rows),
             "pareto.png": _plot_pareto(rows)}
    files.update({b[1]: b[3] for b in tech if b[0] == "img"})
    tech = [b[:3] if b[0] == "img" else b for b in tech]
    blocks = _blocks(params["title"], rows, refs, agreement, tech, sources, gpu)
    files["report.md"] = _markdown(blocks).encode()
    files["report.html"] = _html(blocks, files).encode()
    files["metrics.json"] = (json.dumps(_metrics(rows, refs, agreement), indent=2) + "\n").encode()
    for name, data in files.items():  # each file atomically; other files in out_dir are left alone
        atomic.write_bytes(Path(out_dir) / name, data)
    return {"out_dir": str(out_dir), "rows": len(rows), "files": list(files)}


# ---- inputs

def _get(d, *keys):
    for k in keys:
        if isinstance(k, int):
            d = d[k] if isinstance(d, list) and len(d) > k else None
        else:
            d = d.get(k) if isinstance(d, dict) else None
    return d


def _num(x, what: str):
    if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
        raise UserError(f"{what} must be a number, got {x!r}")
    return x


def _spread(d, what: str) -> tuple:
    return tuple(_num(_get(d, k), f"{what}.{k}") for k in ("median", "min", "max"))


def _load(folder: Path) -> dict:
    m = manifest.verify(folder)
    if m.get("stage") not in ("benchmark", "benchmark_reference"):
        raise UserError(f"{folder} is not a benchmark job (stage {m.get('stage')!r})")
    path = folder / RESULTS
    if not path.is_file() or RESULTS not in m.get("files", {}):
        raise UserError(f"benchmark job {folder} has no {RESULTS} listed in its manifest")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {path}: {e.msg}") from None
    src = {"dir": folder, "manifest": m, "results": res, "tag": f"[bench:{m['digest'][:12]}]"}
    if m["stage"] == "benchmark_reference":
        ref = _get(res, "reference")
        if not isinstance(ref, dict) or not isinstance(_get(ref, "backend"), str):
            raise UserError(f"{path}: 'reference' must be an object with a 'backend'")
        return {**src, "kind": "reference", "backend": ref["backend"], "impl": str(_get(ref, "impl") or DASH),
                "decode": _spread(_get(ref, "decode_tps"), f"{path}: decode_tps"),
                "ours": _spread(_get(ref, "ours_decode_tps"), f"{path}: ours_decode_tps"),
                "ratio": _num(_get(ref, "paired_ours_over_reference", "median"), f"{path}: ratio"),
                "ratio_ci": _get(ref, "paired_ours_over_reference", "ci95")}
    run = _get(res, "run")
    if not isinstance(_get(run, "backend"), str) or not isinstance(_get(run, "config"), str):
        raise UserError(f"{path}: 'run' must be an object with 'backend' and 'config'")
    return {**src, "kind": "run", "row": _row(run, f"{path}"), "top1": _get(res, "top1") or [],
            "greedy": _get(res, "greedy") or []}


def _row(run: dict, where: str) -> dict:
    m = {k: _num(_get(run, *p), f"{where}: {'.'.join(map(str, p))}") for k, p in _FIELDS.items()}
    frac, speedup = m["weight_bytes_fraction"], m["speedup_vs_baseline"]
    m["structural_bound"] = bound = 1 / frac if frac else None
    if speedup is not None and bound:
        m["speedup_over_bound"] = speedup / bound
    if speedup is not None and bound and bound > 1:
        share = lambda x: (x - 1) / (bound - 1)  # noqa: E731
        m["realized_share"] = share(speedup)
        if m["speedup_ci95_lo"] is not None and m["speedup_ci95_hi"] is not None:
            m["realized_share_ci95_lo"], m["realized_share_ci95_hi"] = share(m["speedup_ci95_lo"]), share(m["speedup_ci95_hi"])
    batch = {}
    for b in _get(run, "speed", "batch") or []:
        size = _get(b, "batch_size")
        if not isinstance(size, int) or isinstance(size, bool):
            raise UserError(f"{where}: speed.batch entries need an integer batch_size")
        batch[size] = _spread(_get(b, "tps"), f"{where}: batch {size} tps")
        m[f"batch_tps_bs{size}"] = batch[size][0]
        m[f"batch_bound_bs{size}"] = _num(_get(b, "structural_bound"), f"{where}: batch {size} structural_bound")
    weights = _get(run, "structural", "weights_usage") or {}
    if set(weights) - {"full"}:  # gear occupancy: the share of decode steps per weight set
        m.update({f"weights_share_{k}": _num(v, f"{where}: weights_usage.{k}") for k, v in weights.items()})
    return {"backend": run["backend"], "config": run["config"], "batch": batch,
            "decode": _spread(_get(run, "speed", "decode_tps"), f"{where}: decode_tps"),
            "heads": _get(run, "structural", "head_usage") or {}, "weights": weights,
            "metrics": {k: v for k, v in m.items() if v is not None}}


def _rows(sources: list[dict]) -> list[dict]:
    rows, seen = [], set()
    for s in sources:
        if s["kind"] != "run":
            continue
        key = (s["row"]["backend"], s["row"]["config"])
        if key in seen:
            raise UserError(f"{s['dir']}: a second job for {key[0]}/{key[1]}")
        seen.add(key)
        rows.append({**s["row"], "tag": s["tag"], "source": s})
    _same_picks(rows)
    return rows


def _same_picks(rows: list[dict]) -> None:
    """GPQA: how often each configuration picks the option its backend's baseline picks (from the jobs' picks)."""
    picks = {(r["backend"], r["config"]): _get(r["source"]["results"], "run", "quality", "gpqa_picks") for r in rows}
    for r in rows:
        mine, base = picks[(r["backend"], r["config"])], picks.get((r["backend"], "baseline"))
        if isinstance(mine, list) and isinstance(base, list) and mine and len(mine) == len(base):
            r["metrics"]["gpqa_same_pick"] = float(np.mean([a == b for a, b in zip(mine, base, strict=True)]))


def _agreement(rows: list[dict]) -> dict[str, dict]:
    """torch vs MLX per configuration: teacher-forced top-1 and greedy continuations, from the jobs."""
    out = {}
    by = {(r["backend"], r["config"]): r["source"] for r in rows}
    for (backend, config), t in sorted(by.items()):
        m = by.get(("mlx", config))
        if backend != "torch" or m is None:
            continue
        n = min(len(t["top1"]), len(m["top1"]))  # one backend may score only the first texts (quality.check_texts)
        same = [np.array(a) == np.array(b) for a, b in zip(t["top1"][:n], m["top1"][:n], strict=True) if len(a) == len(b)]
        if not same:
            continue
        greedy = [a == b for a, b in zip(t["greedy"], m["greedy"], strict=False)]
        out[config] = {"torch_vs_mlx_top1": float(np.concatenate(same).mean()), "tokens": int(sum(map(len, same))),
                       "greedy_identical": int(sum(greedy)), "greedy_prompts": len(greedy)}
    return out


def _metrics(rows: list[dict], refs: list[dict], agreement: dict) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["backend"], {})[r["config"]] = r["metrics"]
    out["agreement"] = agreement.get("baseline", {})
    out["agreement_by_config"] = agreement
    out["reference_ratios"] = {s["backend"]: s["ratio"] for s in refs if s["ratio"] is not None}
    return out


# ---- content

def _f(x, fmt: str = "{:.1f}") -> str:
    return DASH if x is None else fmt.format(x)


def _med(t: tuple) -> str:
    med, lo, hi = t
    return _f(med) + (f" [{lo:.1f}–{hi:.1f}]" if None not in (med, lo, hi) else "")


def _ci(m, key: str, ci: str, fmt: str, fmt_ci: str) -> str:
    lo, hi = m(f"{ci}_lo"), m(f"{ci}_hi")
    interval = f" [{fmt_ci.format(lo)}–{fmt_ci.format(hi)}]" if None not in (lo, hi) and lo != hi else ""
    return _f(m(key), fmt) + interval


def _backends(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["backend"] for r in rows))


def _glance(rows: list[dict], backend: str) -> tuple:
    body = []
    for r in sorted((r for r in rows if r["backend"] == backend), key=lambda r: -r["metrics"].get("speedup_vs_baseline", 0)):
        m = r["metrics"].get
        body.append([r["config"], _ci(m, "speedup_vs_baseline", "speedup_ci95", "{:.3f}×", "{:.3f}"),
                     _f(m("structural_bound"), "{:.3f}×"), _ci(m, "realized_share", "realized_share_ci95", "{:.0%}", "{:.0%}"),
                     _f(m("kl_to_baseline"), "{:.3f}"), _f(m("top1_agreement"), "{:.1%}"), _f(m("perplexity"), "{:.2f}"),
                     r["tag"]])
    return ("table", ["config", "speedup [95% CI]", "bound", "realized share [95% CI]", "KL", "top-1", "perplexity",
                      "source"], body)


def _reading(rows: list[dict], backend: str) -> str:
    """A plain sentence or three: the best trade, what does not pay, where quality goes."""
    mine = [r for r in rows if r["backend"] == backend and r["config"] != "baseline"]
    g = lambda r, k: r["metrics"].get(k)  # noqa: E731
    base = [r for r in rows if r["backend"] == backend and r["config"] == "baseline" and g(r, "kl_to_float32") is not None]
    precision = (f"The {backend} baseline runs in reduced precision: KL {g(base[0], 'kl_to_float32'):.4f} nats/token and top-1 "
                 f"agreement {g(base[0], 'top1_to_float32'):.1%} against the same model in float32. ") if base else ""
    if not mine:
        return f"{precision}{backend}: only the baseline ran."
    fast = max(mine, key=lambda r: g(r, "speedup_vs_baseline") or 0)
    out = [f"On {backend}, {fast['config']} is the fastest at {g(fast, 'speedup_vs_baseline'):.3f}× "
           f"(bound {_f(g(fast, 'structural_bound'), '{:.3f}')}×) for a KL of {_f(g(fast, 'kl_to_baseline'), '{:.3f}')} "
           f"nats/token and top-1 agreement {_f(g(fast, 'top1_agreement'), '{:.1%}')}."]
    flat = [r["config"] for r in mine if (g(r, "speedup_ci95_lo") or 0) <= 1.0]
    if flat:
        out.append(f"No measurable speedup (interval reaches 1.0) for: {', '.join(flat)}.")
    lossy = [r for r in mine if (g(r, "kl_to_baseline") or 0) > 0]
    if lossy:
        best = min(lossy, key=lambda r: g(r, "kl_to_baseline") / max((g(r, "speedup_vs_baseline") or 1) - 1, 1e-3))
        out.append(f"Least quality lost per unit of speedup: {best['config']}.")
    return precision + " ".join(out)


def _speed_table(rows: list[dict]) -> tuple:
    body = []
    for r in rows:
        m = r["metrics"].get
        limit = f"{_f(m('bandwidth_share'), '{:.0%}')} of {_f(m('bandwidth_limit_tps'), '{:.0f}')}"
        body.append([r["backend"], r["config"], _med(r["decode"]), _f(m("baseline_decode_tps")), limit, _f(m("prefill_tps")),
                     f"{_f(m('latency_ms_p50'))} / {_f(m('latency_ms_p95'))}", _f(m("peak_rss_mb"), "{:.0f}"), r["tag"]])
    return ("table", ["backend", "config", "decode tok/s", "its baseline tok/s", "share of its bandwidth limit (tok/s)",
                      "prefill tok/s", "p50 / p95 ms", "peak RSS MB", "source"], body)


def _batch_table(rows: list[dict]) -> tuple:
    """Batched throughput per batch size, with the structural bound of the batch's own steps."""
    sizes = sorted({b for r in rows for b in r["batch"]})
    body = [[r["backend"], r["config"], *[_f(r["batch"].get(b, (None,))[0]) + _bound(r["metrics"].get(f"batch_bound_bs{b}"))
                                          for b in sizes]] for r in rows]
    return ("table", ["backend", "config", *[f"bs {b} tok/s" for b in sizes]], body)


def _bound(b) -> str:
    return f" (bound {b:.2f}×)" if b is not None and b > 1.0005 else ""


def _quality_table(rows: list[dict]) -> tuple:
    body = []
    for r in rows:
        m = r["metrics"].get
        gsm = _f(m("gsm8k_accuracy"), "{:.1%}") + (f" (n={m('gsm8k_n')})" if m("gsm8k_n") is not None else "")
        gpqa = _f(m("gpqa_accuracy"), "{:.0%}") + (f" / {_f(m('gpqa_same_pick'), '{:.0%}')} (n={m('gpqa_n')})"
                                                    if m("gpqa_n") is not None else "")
        body.append([r["backend"], r["config"], _f(m("perplexity"), "{:.3f}"), _f(m("kl_to_baseline"), "{:.3g}"),
                     _f(m("top1_agreement"), "{:.1%}"), gsm, gpqa, r["tag"]])
    return ("table", ["backend", "config", "perplexity", "KL", "top-1", "GSM8K", "GPQA acc / same pick as baseline",
                      "source"], body)


def _structure_table(rows: list[dict]) -> tuple:
    """What the decode steps read and computed, and which head / weight set they used."""
    body = []
    for r in rows:
        m = r["metrics"].get
        heads = ", ".join(f"{k} {v:.0%}" for k, v in r["heads"].items()) or DASH
        weights = ", ".join(f"{k} {v:.0%}" for k, v in r["weights"].items()) or DASH
        body.append([r["backend"], r["config"], _f(m("weight_bytes_fraction"), "{:.1%}"), _f(m("flops_fraction"), "{:.1%}"),
                     heads, weights])
    return ("table", ["backend", "config", "bytes read", "FLOPs", "head used", "weights read (decode steps)"], body)


def _quality_scope(rows: list[dict]) -> str:
    """How much text each backend's teacher-forced quality covers (a backend outside quality.backends scores
    only the first texts)."""
    tokens = {}
    for r in rows:
        tokens.setdefault(r["backend"], set()).add(r["metrics"].get("eval_tokens"))
    parts = [f"{b} {', '.join(f'{t:,}' for t in sorted(v - {None})) or DASH}" for b, v in tokens.items()]
    return ("Perplexity, KL and top-1 are teacher-forced on held-out eval text; tokens scored per job: "
            + "; ".join(parts) + " (benchmark.quality.backends score all its texts, other backends the first "
            "check_texts, enough for the torch vs MLX agreement below).")


def _category_table(rows: list[dict]) -> tuple | None:
    cats = sorted({c for r in rows for c in (_get(r["source"]["results"], "run", "quality", "by_category") or {})})
    if not cats:
        return None
    body = []
    for r in rows:
        by = _get(r["source"]["results"], "run", "quality", "by_category") or {}
        body.append([r["backend"], r["config"], *[_f(_get(by, c, "kl_to_baseline"), "{:.3f}") for c in cats]])
    return ("table", ["backend", "config", *[f"KL {c}" for c in cats]], body)


def _references(refs: list[dict]) -> tuple:
    if not refs:
        return ("p", "No reference generate() timings in these runs.")
    return ("table", ["backend", "reference", "reference decode tok/s", "ours (baseline) decode tok/s",
                      "ours / reference [95% CI]", "source"],
            [[s["backend"], s["impl"], _med(s["decode"]), _med(s["ours"]),
              _f(s["ratio"], "{:.2f}×") + (f" [{s['ratio_ci'][0]:.2f}–{s['ratio_ci'][1]:.2f}]" if s["ratio_ci"] else ""),
              s["tag"]] for s in refs])


def _agreement_block(agreement: dict) -> tuple:
    if not agreement:
        return ("p", "Only one backend ran: no agreement measured.")
    return ("table", ["config", "torch vs MLX top-1", "tokens", "greedy identical"],
            [[c, _f(a["torch_vs_mlx_top1"], "{:.2%}"), f"{a['tokens']:,}", f"{a['greedy_identical']} / {a['greedy_prompts']}"]
             for c, a in agreement.items()])


def _setup(sources: list[dict]) -> str:
    model = _get(sources[0]["results"], "model") or {}
    size = ", ".join(_f(_num(_get(model, k), f"model.{k}"), fmt) for k, fmt in
                     (("params", "{:,} params"), ("weight_bytes", "{:,} weight bytes"), ("num_layers", "{} layers")))
    envs = {}
    for s in sources:  # one line per backend
        envs.setdefault(s["backend"] if s["kind"] == "reference" else s["row"]["backend"],
                        _get(s["results"], "environment") or {})
    lines = []
    for backend, env in envs.items():
        blas = _get(env, "blas")
        blas = f"; BLAS {', '.join(f'{k}: {v}' for k, v in blas.items())}" if isinstance(blas, dict) else ""
        matmul = f"; decode matmuls: {env['decode_matmul']}" if _get(env, "decode_matmul") else ""
        lines.append(f"{backend} on {_get(env, 'device') or DASH} ({_get(env, 'cpu') or DASH}, "
                     f"{_get(env, 'threads') or DASH} threads){matmul}{blas}")
    return f"Model {_get(model, 'name') or DASH} ({size}). " + "; ".join(lines) + "."


def _provenance(sources: list[dict]) -> tuple:
    body = []
    for s in sources:
        m = s["manifest"]
        inputs = ", ".join(f"{k}={_get(v, 'sha256')[:12]}" for k, v in (m.get("inputs") or {}).items()
                           if isinstance(_get(v, "sha256"), str)) or DASH
        pkgs = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items()) or DASH
        body.append([s["tag"], "/".join(Path(s["dir"]).parts[-2:]), inputs, (m.get("code") or DASH)[:12], pkgs])
    return ("table", ["source (manifest digest)", "job", "inputs (sha256)", "code", "packages"], body)


def _blocks(title, rows, refs, agreement, tech, sources, gpu=()) -> list[tuple]:
    out = [("h1", title), ("p", _setup(sources))]
    for b in _backends(rows):
        out += [("h2", f"At a glance: {b}"), ("lead", _reading(rows, b)), _glance(rows, b)]
    out += [("img", "speed_quality.png", PLOTS["speed_quality.png"]), ("p", HOW_TO_READ),
            ("img", "pareto.png", PLOTS["pareto.png"]), ("p", _fronts_text(rows)),
            ("h2", "Speed"), _speed_table(rows), ("h3", "Batched decode"), _batch_table(rows),
            ("img", "batch_throughput.png", PLOTS["batch_throughput.png"]),
            ("h2", "Quality"), _quality_table(rows), ("p", _quality_scope(rows)),
            ("h3", "What the decode steps read"), _structure_table(rows)]
    cat = _category_table(rows)
    if cat:
        out += [("h3", "KL to the baseline per eval category"), cat]
    out += [("h2", "Against the libraries' own generate()"), _references(refs),
            ("h2", "torch vs MLX agreement"), _agreement_block(agreement)]
    if gpu:
        out += [("h2", "On a CUDA GPU (measured elsewhere: report.gpu_results)"), *gpu]
    if tech:
        out += [("h2", "Technique artifacts"), *tech]
    return out + [("h2", "Provenance"), _provenance(sources)]


def _gpu_blocks(paths: list[Path]) -> list[tuple]:
    """A paragraph and a table per file of scripts/cuda_techniques.py results (committed measurements)."""
    out = []
    for path in paths:
        try:
            shapes = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"report.gpu_results: no file {path}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"report.gpu_results: corrupt {path}: {e.msg}") from None
        if isinstance(shapes, dict) and shapes.get("kind") == "benchmark_jobs":
            out += _gpu_jobs(path, shapes)
            continue
        if not isinstance(shapes, list) or not all(isinstance(_get(s, "modes"), dict) for s in shapes):
            raise UserError(f"report.gpu_results: {path} is neither a list of scripts/cuda_techniques.py results "
                            "(each with 'modes') nor a scripts/benchmark_summary.py file")
        body = []
        for sh in shapes:
            where = f"{path}: {sh.get('shape')}"
            bw = _num(_get(sh, "read_bandwidth_gbs"), f"{where}: read_bandwidth_gbs")
            label = f"{path.parent.name}/{path.name}" if path.name == "results.json" else path.name
            out.append(("p", f"{label}: {sh.get('shape')} shape, {sh.get('dtype')}, on {sh.get('device')} "
                             f"(torch {sh.get('torch')}); read bandwidth measured in the run {_f(bw, '{:.0f}')} GB/s, "
                             f"so {_f(_get(sh, 'limit_tps_batch1'), '{:.0f}')} tok/s at batch 1 reads every weight "
                             "once per token. Random weights: speed only."
                             + {"kernel": " Decode attention: one Triton kernel a layer.",
                                "sdpa": " Decode attention: RoPE, cache writes and SDPA as separate ops."}.get(
                                 sh.get("attention"), "")
                             + RUN_AHEAD.get(sh.get("run_ahead"), "")))
            for mode, m in sh["modes"].items():
                batch = _get(m, "batch") or {}
                paired8 = _get(m, "configs_batch", "8") or {}  # every configuration beside the baseline at batch 8
                for name, c in (_get(m, "configs") or {}).items():
                    ci = _get(c, "speedup_ci95") or [None, None]
                    real = realized_share(_get(c, "speedup"), _get(c, "bound"))  # recomputed: older files kept noise
                    gears = _get(c, "gear_share") or {}  # steps per weight set, where the gears switch them
                    label = name + (f" ({' / '.join(f'{k} {v:.0%}' for k, v in gears.items())})" if gears else "")
                    mixed = _get(c, "mixed_speedup")  # the gears' steps at their sets' static speeds
                    label += f" (at its sets' static speeds {mixed:.3f}x)" if isinstance(mixed, (int, float)) else ""
                    kernel = _get(c, "kernel") or LEGACY_KERNELS.get(name)
                    label += f" [{kernel}]" if kernel else ""
                    body.append([sh.get("shape"), mode, label, _f(_num(_get(c, "decode_tps"), f"{where}: decode_tps")),
                                 f"{_f(_get(c, 'speedup'), '{:.3f}')} [{_f(ci[0], '{:.3f}')}–{_f(ci[1], '{:.3f}')}]",
                                 _f(_get(c, "bound"), "{:.3f}"), DASH if real is None else f"{real:.2f}",
                                 _f(_get(c, "bandwidth_share"), "{:.0%}"), *_batch8(name, paired8, batch)])
        out.append(("table", ["shape", "decode mode", "config", "tok/s (bs 1)", "speedup [95% CI]", "bound",
                              "realized share", "share of bandwidth limit", "bs 8 tok/s",
                              "bs 8 speedup / bound (realized)"], body))
    return out


def _gpu_jobs(path: Path, s: dict) -> list[tuple]:
    """The pipeline's own benchmark jobs run on a GPU (scripts/benchmark_summary.py): real weights, so quality."""
    jobs = _get(s, "jobs")
    if not isinstance(jobs, dict) or "baseline" not in jobs:
        raise UserError(f"report.gpu_results: {path} has no 'jobs' with a baseline")
    base = jobs["baseline"]
    f32 = _get(base, "vs_float32") or {}
    text = (f"{path.name}: the pipeline's benchmark jobs (adaptive-inference benchmark, params as committed but "
            f"benchmark.dtype {s.get('dtype')}) on {s.get('gpu') or s.get('device')} ({s.get('device')}, torch "
            f"{_get(s, 'packages', 'torch')}), model {s.get('model')}, the same eval texts as the CPU tables: "
            f"baseline perplexity {_f(_get(base, 'perplexity'), '{:.2f}')}")
    if f32:
        text += (f"; {s.get('dtype')} against float32 on the same device: KL {_f(_get(f32, 'kl_to_baseline'), '{:.4g}')}"
                 f", top-1 {_f(_get(f32, 'top1_agreement'), '{:.1%}')}")
    shared = _num(_get(s, "concurrent_jobs"), f"{path}: concurrent_jobs") or 1  # above 1 no timing is a job's own
    body = []
    for name, j in jobs.items():
        ci = _get(j, "speedup_ci95") or [None, None]
        acc = [f"{_f(_get(j, k + '_accuracy'), '{:.2f}')} of {_f(_get(j, k + '_n'), '{:.0f}')}" for k in ("gsm8k", "gpqa")]
        speed = [] if shared > 1 else [_f(_num(_get(j, "decode_tps"), f"{path}: {name}: decode_tps")),
                                       f"{_f(_get(j, 'speedup'), '{:.3f}')} [{_f(ci[0], '{:.3f}')}–{_f(ci[1], '{:.3f}')}]"]
        body.append([name, *speed, _f(_get(j, "bound"), "{:.3f}"), _f(_get(j, "kl_to_baseline"), "{:.4g}"),
                     _f(_get(j, "top1_agreement"), "{:.1%}"), _f(_get(j, "perplexity"), "{:.2f}"), *acc])
    if shared > 1:
        text += (f". {shared:.0f} jobs shared the GPU at a time, so no job's timing is its own: this table is quality "
                 "only; the random-weight 8B / 14B rows below are the speed measurements")
    else:
        text += (". Speed on this 135M model at batch 1 is launch-bound on a GPU; the random-weight 8B / 14B rows "
                 "below are the speed measurements")
    head = ["config", *([] if shared > 1 else ["tok/s (bs 1)", "speedup [95% CI]"]), "bound", "KL", "top-1",
            "perplexity", "GSM8K", "GPQA"]
    return [("p", text + "."), ("table", head, body)]


# cuda_techniques --run-ahead (files before it ran every step behind, or ahead without saying so: nothing said)
RUN_AHEAD = {"on": " Generation queues a static plan's next step before reading its token.",
             "off": " Generation reads each token before queuing the next step.",
             "both": " Generation queues a static plan's next step before reading its token; each NAME/behind row is "
                     "that configuration reading each token first (its speedup against the baseline running ahead)."}


# files written before results named their packed sets' kernels: int4 was then quant_cuda's choice, torch's tinygemm
LEGACY_KERNELS = {"int4": "tinygemm", "int4-triton": "triton", "int8": "triton"}


def _batch8(name: str, paired: dict, batch: dict) -> list[str]:
    """(tok/s, speedup / bound (realized share)) of a configuration at batch 8: paired runs where the file has
    them, else the baseline's own batch-8 run."""
    c = _get(paired, name) or {}
    tps = _get(c, "tokens_per_s") if c else (_get(batch, "8", "tokens_per_s") if name == "baseline" else None)
    if not c or name == "baseline":
        return [_f(tps), DASH]
    real = realized_share(_get(c, "speedup"), _get(c, "bound"))
    return [_f(tps), f"{_f(_get(c, 'speedup'), '{:.3f}')} / {_f(_get(c, 'bound'), '{:.3f}')} "
                     f"({DASH if real is None else f'{real:.2f}'})"]


# ---- rendering

def _markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind == "table":
            lines = [a[0], ["---"] * len(a[0]), *a[1]]
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
        else:
            fmt = {"h1": "# {}", "h2": "## {}", "h3": "### {}", "p": "{}", "lead": "**{}**", "img": "![{1}]({0})"}
            out.append(fmt[kind].format(*a))
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple], pngs: dict[str, bytes]) -> str:
    e, body = html.escape, []
    for kind, *a in blocks:
        if kind == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in a[0])
            num = ' class="n"'  # right-aligned numbers
            cells = ["".join(f'<td{num if str(c).lstrip("-")[:1] in "0123456789—" else ""}>{e(str(c))}</td>' for c in row)
                     for row in a[1]]
            body.append(f"<table><tr>{head}</tr>" + "".join(f"<tr>{c}</tr>" for c in cells) + "</table>")
        elif kind == "img":
            data = base64.b64encode(pngs[a[0]]).decode()
            wide = ' class="wide"' if a[0] in ("speed_quality.png", "pareto.png") else ""
            body.append(f'<figure{wide}><img alt="{e(a[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(a[1])}</figcaption></figure>")
        elif kind == "lead":
            body.append(f'<p class="lead">{e(a[0])}</p>')
        else:
            body.append(f"<{kind}>{e(a[0])}</{kind}>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(blocks[0][1])}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _plot_speed_quality(rows: list[dict]) -> bytes:
    """One panel per backend; error bars are the speedup's 95% interval; labels are placed where they cover
    no other label, marker or error bar (plots.place_labels)."""

    backends = _backends(rows)
    fig = plots.figure(5.2 * len(backends), 4.2)
    axes, panels = fig.subplots(1, len(backends), squeeze=False)[0], []
    for ax, b in zip(axes, backends, strict=True):
        pts = [(r["config"], r["metrics"]) for r in rows if r["backend"] == b]
        pts = [(c, m) for c, m in pts if m.get("speedup_vs_baseline") is not None and m.get("kl_to_baseline") is not None]
        ax.axvline(1.0, color="0.6", ls="--", lw=0.8)
        ax.set(title=b, xlabel="decode speedup vs baseline (×)", ylabel="KL to baseline (nats / token)")
        ax.grid(alpha=0.3)
        labels = []
        for i, (c, m) in enumerate(sorted(pts, key=lambda p: p[1]["kl_to_baseline"])):
            x, y = m["speedup_vs_baseline"], m["kl_to_baseline"]
            lo, hi = m.get("speedup_ci95_lo", x), m.get("speedup_ci95_hi", x)
            ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", color=f"C{i % 10}", capsize=3)
            labels.append((c, (x, y), f"C{i % 10}", (lo, hi)))
        ax.margins(0.2)
        panels.append((ax, labels))
    for ax, labels in panels:
        plots.place_labels(fig, ax, labels)
    return plots.png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (gain, loss) that no other point beats on both (gain >= and loss <=, one strictly),
    ordered by gain."""
    front = [i for i, (g, lo) in enumerate(points)
             if not any(g2 >= g and l2 <= lo and (g2 > g or l2 < lo) for g2, l2 in points)]
    return sorted(front, key=lambda i: points[i][0])


# (panel x: name, label, metric -> gain) and (panel y: label, metric -> loss, loss -> shown value)
_PARETO_X = {"realized": ("decode speedup vs baseline (×)", lambda m: m.get("speedup_vs_baseline")),
             "structural": ("structural compute saving (1 / FLOPs share, ×)",
                            lambda m: 1 / m["flops_fraction"] if m.get("flops_fraction") else None)}
_PARETO_Y = [("KL to baseline (nats / token)", lambda m: m.get("kl_to_baseline"), lambda v: v),
             ("top-1 agreement", lambda m: None if m.get("top1_agreement") is None else 1 - m["top1_agreement"],
              lambda v: 1 - v)]


def _pareto_panels(rows: list[dict]) -> list[tuple[str, str, list[tuple[str, dict]]]]:
    """(title, x kind, [(config, metrics)]): the realized speedup per backend, then the structural compute
    saving once per configuration (it does not depend on the backend)."""
    panels = [(b, "realized", [(r["config"], r["metrics"]) for r in rows if r["backend"] == b]) for b in _backends(rows)]
    seen: dict = {}
    for r in rows:
        seen.setdefault(r["config"], r["metrics"])
    return panels + [("structural (all backends)", "structural", list(seen.items()))]


def _front_points(pts, gain, loss) -> tuple[list, list[int]]:
    pts = [(c, gain(m), loss(m)) for c, m in pts]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    return pts, pareto_front([(g, lo) for _, g, lo in pts])


def _plot_pareto(rows: list[dict]) -> bytes:
    panels, configs = _pareto_panels(rows), list(dict.fromkeys(r["config"] for r in rows))
    fig = plots.figure(4.6 * len(panels), 7.6)
    axes, labelled = fig.subplots(2, len(panels), squeeze=False), []
    for col, (title, kind, pts) in enumerate(panels):
        xlabel, gain = _PARETO_X[kind]
        for row, (ylabel, loss, shown) in enumerate(_PARETO_Y):
            ax = axes[row][col]
            ax.set(title=title if row == 0 else "", xlabel=xlabel if row == 1 else "", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.axvline(1.0, color="0.6", ls="--", lw=0.8)
            got, front = _front_points(pts, gain, loss)
            for i, (c, g, lo) in enumerate(got):
                color = f"C{configs.index(c) % 10}"  # one color per configuration in every panel
                ax.plot([g], [shown(lo)], "o", color=color, mfc=color if i in front else "none")
            if len(front) > 1:
                ax.plot([got[i][1] for i in front], [shown(got[i][2]) for i in front], "--", color="0.3", lw=1)
            ax.margins(0.15)
            labelled.append((ax, [(c, (g, shown(lo)), f"C{configs.index(c) % 10}", None) for c, g, lo in got]))
    for ax, labels in labelled:
        plots.place_labels(fig, ax, labels, fontsize=7)
    return plots.png(fig)


def _fronts_text(rows: list[dict]) -> str:
    parts = []
    for title, kind, pts in _pareto_panels(rows):
        for ylabel, loss, _ in _PARETO_Y:
            got, front = _front_points(pts, _PARETO_X[kind][1], loss)
            parts.append(f"{title}, {ylabel.split(' (')[0]}: " + (", ".join(got[i][0] for i in front) or DASH))
    return "On the Pareto front (best quality for its speed, left to right): " + "; ".join(parts) + "."


def _plot_batch(rows: list[dict]) -> bytes:

    fig = plots.figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.set(title="Batch throughput", xlabel="batch size", ylabel="decode tok/s (all sequences)")
    ax.grid(alpha=0.3)
    sizes = sorted({b for r in rows for b, t in r["batch"].items() if t[0] is not None})
    backends, configs = _backends(rows), list(dict.fromkeys(r["config"] for r in rows))
    for r in rows:
        pts = [(b, *t) for b, t in sorted(r["batch"].items()) if t[0] is not None]
        if pts:
            err = [[m - (lo if lo is not None else m) for _, m, lo, _ in pts],
                   [(hi if hi is not None else m) - m for _, m, _, hi in pts]]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, capsize=3,
                        color=f"C{configs.index(r['config']) % 10}", ls=["-", "--", ":"][backends.index(r["backend"]) % 3],
                        marker="osD^"[backends.index(r["backend"]) % 4], label=f"{r['backend']} / {r['config']}")
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7, ncols=2)
    return plots.png(fig)
