"""report: benchmark artifacts -> report.md, one self-contained report.html, metrics.json and plots.

Every number cites the benchmark artifact it came from as [bench:<first 12 hex of its manifest digest>];
the Provenance table maps each tag to that artifact's inputs, code version and packages.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from . import atomic, manifest
from .errors import UserError

RESULTS = "results.json"
DASH = "—"
PLOTS = {"speed_quality.png": "Speed vs quality: decode speedup against KL to the baseline",
         "batch_throughput.png": "Batched greedy decode throughput (median, bars = min–max)"}
PROFILE_PLOT = ("ffn_profile.png", "MLP profile per layer on calib: ablation KL, fire rate, Gini")
_FIELDS = {  # metrics.json key -> path inside one run of results.json
    "decode_tps": ("speed", "decode_tps", "median"),
    "prefill_tps": ("speed", "prefill_tps", "median"),
    "latency_ms_p50": ("speed", "latency_ms", "p50"),
    "latency_ms_p95": ("speed", "latency_ms", "p95"),
    "peak_rss_mb": ("speed", "peak_rss_mb"),
    "perplexity": ("quality", "perplexity"),
    "kl_to_baseline": ("quality", "kl_to_baseline"),
    "top1_agreement": ("quality", "top1_agreement"),
    "gsm8k_accuracy": ("quality", "gsm8k_accuracy"),
    "gsm8k_n": ("quality", "gsm8k_n"),
    "weight_bytes_fraction": ("structural", "weight_bytes_fraction"),
    "flops_fraction": ("structural", "flops_fraction"),
    "speedup_vs_baseline": ("speedup_vs_baseline",),
    "speedup_ci95_lo": ("speedup_ci95", 0),
    "speedup_ci95_hi": ("speedup_ci95", 1),
    "common_head_rate": ("speed", "common_head_rate"),
}
HOW_TO_READ = (
    "Speeds are tokens per second: the median of the timed repeats, with [min–max] across them. "
    "Speedup is decode time per token of the baseline over that of the configuration, paired: each prompt of "
    "each repeat runs every configuration back to back, the speedup is the median of those pairs' ratios and "
    "[lo–hi] its 95% bootstrap interval (same backend, same run). "
    "The structural bound is 1 / (fraction of weight bytes read per token), the speedup a purely "
    "memory-bound decoder would get. speedup / bound is their ratio; realized share = (speedup - 1) / "
    "(bound - 1) is the part of the predicted saving that showed up, with the interval carried over from "
    "the speedup (shown where bound > 1). "
    "KL and top-1 agreement compare each configuration's next-token distribution with the baseline of its "
    "backend, so baseline rows read 0 and 100%. Each row cites its benchmark artifact as [bench:digest]; "
    "the Provenance table lists that artifact's inputs, code version and packages.")
_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1500px;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12.5px;display:block;overflow-x:auto}"
        "th,td{border:1px solid #ccc;padding:3px 7px}th{background:#f2f2f2;white-space:nowrap}"
        "td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
        "tr:nth-child(even){background:#fafafa}figure{display:inline-block;margin:0 1em 1em 0;"
        "max-width:calc(50% - 1em)}img{max-width:100%}figcaption{font-size:12px;color:#555}")


def build(params: dict, results_dirs: list[Path], out_dir: Path, artifacts: list[Path] = ()) -> dict:
    """Validate every results dir (and technique artifact), render everything in memory, then write the
    files into out_dir."""
    if not results_dirs:
        raise UserError("report needs at least one benchmark results folder")
    sources = [_load(Path(d)) for d in results_dirs]
    rows = _rows(sources)
    tech = _techniques([Path(a) for a in artifacts])
    blocks = _blocks(params["title"], rows, sources)
    blocks[-2:-2] = tech["blocks"]
    files = {"speed_quality.png": _plot_speed_quality(rows), "batch_throughput.png": _plot_batch(rows),
             PROFILE_PLOT[0]: _plot_profile(tech["profile"])}
    files["report.md"] = _markdown(blocks).encode()
    files["report.html"] = _html(blocks, files).encode()
    files["metrics.json"] = (json.dumps(_metrics(rows, sources), indent=2) + "\n").encode()
    for name, data in files.items():  # each file atomically; other files in out_dir are left alone
        atomic.write_bytes(Path(out_dir) / name, data)
    return {"out_dir": str(out_dir), "rows": len(rows), "sources": [s["tag"] for s in sources],
            "files": list(files)}


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
    """(median, min, max) of a timing block; None where missing."""
    return tuple(_num(_get(d, k), f"{what}.{k}") for k in ("median", "min", "max"))


def _load(folder: Path) -> dict:
    m = manifest.verify(folder, stage="benchmark")
    path = folder / RESULTS
    if not path.is_file() or RESULTS not in m.get("files", {}):
        raise UserError(f"benchmark artifact {folder} has no {RESULTS} listed in its manifest")
    if not isinstance(m.get("digest"), str):
        raise UserError(f"corrupt manifest in {folder}: no digest")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {path}: {e.msg}") from None
    runs = _get(res, "runs")
    if not isinstance(runs, list) or not runs or not all(
            isinstance(_get(r, "backend"), str) and isinstance(_get(r, "config"), str) for r in runs):
        raise UserError(f"{path}: 'runs' must be a non-empty list of runs with 'backend' and 'config'")
    refs, agreement = _get(res, "references") or [], _get(res, "agreement") or {}
    if not isinstance(refs, list) or not isinstance(agreement, dict):
        raise UserError(f"{path}: 'references' must be a list and 'agreement' an object")
    refs = [{"backend": str(_get(r, "backend")), "impl": str(_get(r, "impl") or DASH),
             "decode": _spread(_get(r, "decode_tps"), f"{path}: references.decode_tps"),
             "ratio": _num(_get(r, "ours_over_reference"), f"{path}: references.ours_over_reference")}
            for r in refs]
    agreement = {k: _num(v, f"{path}: agreement.{k}") for k, v in agreement.items()}
    return {"dir": folder, "label": folder.name, "manifest": m, "results": res,
            "tag": f"[bench:{m['digest'][:12]}]",
            "runs": [_row(r, f"{path} run {r['backend']}/{r['config']}") for r in runs],
            "references": refs, "agreement": agreement}


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
    return {"backend": run["backend"], "config": run["config"], "batch": batch,
            "decode": _spread(_get(run, "speed", "decode_tps"), f"{where}: decode_tps"),
            "metrics": {k: v for k, v in m.items() if v is not None}}


def _rows(sources: list[dict]) -> list[dict]:
    """One row per backend x config; a repeat from a later folder becomes config@folder-name."""
    rows, seen = [], set()
    for s in sources:
        for r in s["runs"]:
            key = r["config"] if (r["backend"], r["config"]) not in seen else f"{r['config']}@{s['label']}"
            if (r["backend"], key) in seen or r["backend"] in ("agreement", "reference_ratios"):
                raise UserError(f"{s['dir']}: duplicate or reserved run {r['backend']}/{key}")
            seen.add((r["backend"], key))
            rows.append({**r, "config": key, "run_config": r["config"], "tag": s["tag"], "source": s})
    return rows


def _metrics(rows: list[dict], sources: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["backend"], {})[r["config"]] = r["metrics"]
    out["agreement"], out["reference_ratios"] = {}, {}
    for s in sources:
        items = [("agreement", k, v) for k, v in s["agreement"].items()]
        items += [("reference_ratios", r["backend"], r["ratio"]) for r in s["references"]]
        for section, k, v in items:
            if v is not None:  # a repeat from a later folder is keyed name@folder-name
                out[section][k if k not in out[section] else f"{k}@{s['label']}"] = v
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


def _setup(s: dict) -> str:
    model, env = _get(s["results"], "model") or {}, _get(s["results"], "environment") or {}
    size = [_f(_num(_get(model, k), f"model.{k}"), fmt) for k, fmt in
            (("params", "{:,} params"), ("weight_bytes", "{:,} weight bytes"), ("num_layers", "{} layers"))]
    blas = _get(env, "blas")
    blas = ", ".join(f"{k}: {v}" for k, v in blas.items()) if isinstance(blas, dict) else blas or DASH
    return (f"{s['tag']} Model {_get(model, 'name') or DASH} ({', '.join(size)}); "
            f"CPU {_get(env, 'cpu') or DASH}, {_get(env, 'threads') or DASH} threads; BLAS {blas}.")


def _main_table(rows: list[dict]) -> tuple:
    sizes = sorted({b for r in rows for b in r["batch"]})
    head = ["backend", "config", "decode tok/s", "prefill tok/s", "p50 / p95 ms", "peak RSS MB",
            *[f"bs {b} tok/s" for b in sizes], "speedup [95% CI]", "bound", "speedup / bound", "realized share [95% CI]",
            "common head", "perplexity", "KL",
            "top-1",
            "GSM8K", "source"]
    body = []
    for r in rows:
        m = r["metrics"].get
        gsm = _f(m("gsm8k_accuracy"), "{:.1%}") + (f" (n={m('gsm8k_n')})" if m("gsm8k_n") is not None else "")
        body.append([r["backend"], r["config"], _med(r["decode"]), _f(m("prefill_tps")),
                     f"{_f(m('latency_ms_p50'))} / {_f(m('latency_ms_p95'))}", _f(m("peak_rss_mb"), "{:.0f}"),
                     *[_f(r["batch"].get(b, (None,))[0]) for b in sizes],
                     _ci(m, "speedup_vs_baseline", "speedup_ci95", "{:.3f}×", "{:.3f}"),
                     _f(m("structural_bound"), "{:.3f}×"), _f(m("speedup_over_bound"), "{:.2f}"),
                     _ci(m, "realized_share", "realized_share_ci95", "{:.0%}", "{:.0%}"),
                     _f(m("common_head_rate"), "{:.0%}"),
                     _f(m("perplexity"), "{:.3f}"),
                     _f(m("kl_to_baseline"), "{:.3g}"), _f(m("top1_agreement"), "{:.1%}"), gsm, r["tag"]])
    return ("table", head, body)


def _references(rows: list[dict], sources: list[dict]) -> tuple:
    body = []
    for s in sources:
        for ref in s["references"]:
            ours = next((r for r in rows if r["source"] is s and r["backend"] == ref["backend"]
                         and r["run_config"] == "baseline"), None)
            body.append([ref["backend"], ref["impl"], _med(ref["decode"]),
                         _med(ours["decode"]) if ours else DASH, _f(ref["ratio"], "{:.2f}×"), s["tag"]])
    if not body:
        return ("p", "No reference generate() timings in these runs.")
    return ("table", ["backend", "reference", "reference decode tok/s", "ours (baseline) decode tok/s",
                      "ours / reference", "source"], body)


def _agreement(s: dict) -> str:
    a = s["agreement"]
    return (f"{s['tag']} torch vs MLX (same weights, baseline): top-1 agreement "
            f"{_f(a.get('torch_vs_mlx_top1'), '{:.2%}')} over {_f(a.get('tokens'), '{:,}')} tokens; greedy "
            f"continuations identical on {_f(a.get('greedy_identical'), '{}')} / "
            f"{_f(a.get('greedy_prompts'), '{}')} prompts.")


def _provenance(sources: list[dict]) -> tuple:
    body = []
    for s in sources:
        m = s["manifest"]
        inputs = ", ".join(f"{k}={_get(v, 'sha256')[:12]}" for k, v in (m.get("inputs") or {}).items()
                           if isinstance(_get(v, "sha256"), str)) or DASH
        pkgs = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items()) or DASH
        body.append([s["tag"], str(s["dir"]), inputs, m.get("code_version", DASH),
                     m.get("created", DASH), pkgs])
    return ("table", ["source (manifest digest)", "folder", "inputs (sha256)", "code version", "created",
                      "packages"], body)


def _blocks(title: str, rows: list[dict], sources: list[dict]) -> list[tuple]:
    agree = [("p", _agreement(s)) for s in sources if s["agreement"]]
    agree = agree or [("p", "Only one backend ran: no agreement measured.")]
    return [("h1", title), ("p", HOW_TO_READ), *[("p", _setup(s)) for s in sources],
            ("h2", "Results"), _main_table(rows),
            ("h2", "Against the libraries' own generate()"), _references(rows, sources),
            ("h2", "torch vs MLX agreement"), *agree,
            ("h2", "Plots"), *[("img", name, alt) for name, alt in PLOTS.items()],
            ("h2", "Provenance"), _provenance(sources)]


# ---- rendering

def _markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind == "table":
            lines = [a[0], ["---"] * len(a[0]), *a[1]]
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
        else:
            out.append({"h1": "# {}", "h2": "## {}", "h3": "### {}", "p": "{}", "img": "![{1}]({0})"}[kind].format(*a))
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple], pngs: dict[str, bytes]) -> str:
    e, body = html.escape, []
    for kind, *a in blocks:
        if kind == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in a[0])
            num = ' class="n"'  # right-aligned numbers
            cells = ["".join(f'<td{num if str(c)[:1] in "0123456789—" else ""}>{e(str(c))}</td>' for c in row)
                     for row in a[1]]
            body.append(f"<table><tr>{head}</tr>" + "".join(f"<tr>{c}</tr>" for c in cells) + "</table>")
        elif kind == "img":
            data = base64.b64encode(pngs[a[0]]).decode()
            body.append(f'<figure><img alt="{e(a[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(a[1])}</figcaption></figure>")
        else:
            body.append(f"<{kind}>{e(a[0])}</{kind}>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(blocks[0][1])}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _styles(rows: list[dict]) -> tuple[dict, dict]:
    """Colour per backend, marker per config, in order of first appearance."""
    backends, configs = dict.fromkeys(r["backend"] for r in rows), dict.fromkeys(r["config"] for r in rows)
    return ({b: f"C{i % 10}" for i, b in enumerate(backends)},
            {c: "osD^vPX*<>"[i % 10] for i, c in enumerate(configs)})


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.margins(0.12)  # room for point labels
    return fig, ax


def _png(fig, ax) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if ax.has_data():
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def _plot_speed_quality(rows: list[dict]) -> bytes:
    fig, ax = _figure("Speed vs quality", "decode speedup vs baseline (×)",
                      "KL to baseline (mean per token)")
    colours, markers = _styles(rows)
    ax.axvline(1.0, color="0.6", ls="--", lw=0.8)
    for r in rows:
        x, y = r["metrics"].get("speedup_vs_baseline"), r["metrics"].get("kl_to_baseline")
        if x is not None and y is not None:
            ax.scatter(x, y, s=55, color=colours[r["backend"]], marker=markers[r["config"]],
                       label=f"{r['backend']} / {r['config']}")
            ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    return _png(fig, ax)


def _plot_profile(profile: list[dict]) -> bytes:
    fig, ax = _figure("MLP profile (calib)", "layer", "KL when only this MLP is zeroed")
    if profile:
        layers = [r["layer"] for r in profile]
        ax.bar(layers, [r["kl"] for r in profile], color="C0", alpha=0.7, label="ablation KL (left)")
        ax.set_yscale("log")
        twin = ax.twinx()
        twin.plot(layers, [r["fire_rate"] for r in profile], "C1o-", ms=3, label="fire rate (right)")
        twin.plot(layers, [r["gini"] for r in profile], "C2s-", ms=3, label="Gini (right)")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=8, loc="upper right")
    return _png(fig, ax)


def _techniques(artifacts: list[Path]) -> dict:
    """Summaries of the technique artifacts the configurations applied, each citing its digest."""
    blocks, profile = [], []
    for a in artifacts:
        m = manifest.verify(a)
        tag, stage = f"[{m['stage']}:{m['digest'][:12]}]", m["stage"]
        if stage == "profile_ffn":
            profile = json.loads((a / "profile.json").read_text())["layers"]
            blocks += [("h3", f"MLP profile {tag}"),
                       ("table", ["layer", "ablation KL", "perplexity +", "fire rate", "Gini", "MLP bytes share"],
                        [[r["layer"], _f(r["kl"], "{:.3f}"), _f(r["perplexity_delta"], "{:.2f}"),
                          _f(r["fire_rate"], "{:.1%}"), _f(r["gini"], "{:.3f}"), _f(r["mlp_bytes_share"], "{:.2%}")]
                         for r in profile]),
                       ("img", *PROFILE_PLOT)]
        elif stage == "make_lobotomy":
            plan = json.loads((a / "lobotomy.json").read_text())
            blocks.append(("p", f"Lobotomy {tag}: MLPs of layers {plan['cut']} zeroed; whole-cut KL on calib "
                                f"{plan['calib_kl']:.3f} (budget {plan['budget']['max_kl']}), calib perplexity "
                                f"{plan['calib_perplexity']:.2f}."))
        elif stage == "train_vocab_router":
            r = json.loads((a / "router.json").read_text())
            c = r["calib"]
            blocks.append(("p", f"Vocab router {tag}: {r['sizes']['common_ids']} common ids "
                                f"({r['common']['share_of_vocab']:.1%} of the vocabulary) cover {r['common']['coverage']:.1%} "
                                f"of train tokens; router {r['sizes']['router_params']} params, threshold "
                                f"{r['threshold']:.3f}; on calib: recall of rare steps {c['recall']:.1%}, precision "
                                f"{c['precision']:.1%}, common head on {c['common_head_rate']:.1%} of steps "
                                f"(rare steps {c['rare_rate']:.1%})."))
    if blocks:
        blocks.insert(0, ("h2", "Technique artifacts"))
    return {"blocks": blocks, "profile": profile}


def _plot_batch(rows: list[dict]) -> bytes:
    fig, ax = _figure("Batch throughput", "batch size", "decode tok/s (all sequences)")
    colours, markers = _styles(rows)
    sizes = sorted({b for r in rows for b, t in r["batch"].items() if t[0] is not None})
    for r in rows:
        pts = [(b, *t) for b, t in sorted(r["batch"].items()) if t[0] is not None]
        if pts:
            bs, med = [p[0] for p in pts], [p[1] for p in pts]
            err = [[m - (lo if lo is not None else m) for _, m, lo, _ in pts],
                   [(hi if hi is not None else m) - m for _, m, _, hi in pts]]
            ax.errorbar(bs, med, yerr=err, capsize=3, color=colours[r["backend"]],
                        marker=markers[r["config"]], label=f"{r['backend']} / {r['config']}")
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xticks([], minor=True)
    return _png(fig, ax)
