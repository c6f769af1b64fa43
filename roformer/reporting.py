"""Evaluation results -> results.json / results.csv / results.md and PNG plots (the dashboard is logger.py's).

``results.json``'s format, and the identity fields every row carries: :mod:`roformer.result_rows`.

A *variant* is what a reader compares: seeds of one variant are aggregated (mean and standard deviation) in the
markdown and plots.

Every file is written through :func:`roformer.files.atomic_write`: complete or absent, readable as a plain
``open()`` would have made it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from roformer.files import atomic_write
from roformer.probe_report import sections_markdown, sections_terminal
from roformer.result_rows import row_base_variant, row_family

CSV_FIELDS = [
    "label",
    "variant",
    "scheme",
    "rope_scaling",
    "seed",
    "train_len",
    "protocol",
    "length",
    "status",
    "ppl",
    "ratio",
    "bits_per_byte",
    "word_ppl",
    "nll_sum",
    "tokens",
    "bytes",
    "words",
    "note",
    "family",  # the identity fields a spreadsheet groups by (results.json has them all)
    "fine_tuned",
    "init_from",
]


def add_ratios(rows: list[dict]) -> None:
    """ratio = ppl / ppl at the training length, within (label, rope_scaling, protocol)."""
    base = {
        (r["label"], r["rope_scaling"], r["protocol"]): r["ppl"]
        for r in rows
        if r["status"] == "ok" and r["length"] == r["train_len"]
    }
    for r in rows:
        b = base.get((r["label"], r["rope_scaling"], r["protocol"]))
        r["ratio"] = r["ppl"] / b if r["status"] == "ok" and b else None


def aggregate(rows: list[dict]) -> dict:
    """(variant, protocol, length) -> {"mean", "std", "n", "ratio_mean", "status", "note"} over seeds."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["protocol"], r["length"])].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
            ppl = np.array([r["ppl"] for r in ok])
            ratios = [r["ratio"] for r in ok if r.get("ratio") is not None]
            out[key] = {
                "mean": float(ppl.mean()),
                "std": float(ppl.std(ddof=1)) if len(ok) > 1 else 0.0,
                "n": len(ok),
                "ratio_mean": float(np.mean(ratios)) if ratios else None,
                "status": "ok",
                "note": "",
            }
        else:
            out[key] = {"mean": None, "std": None, "n": 0, "ratio_mean": None, "status": rs[0]["status"],
                        "note": rs[0]["note"]}
    return out


def _cell_text(a: dict) -> str:
    if a["status"] != "ok":
        return a["note"] if a["status"] == "n/a" else "skipped"
    if a["n"] > 1:
        return f"{a['mean']:.2f} ± {a['std']:.2f}"
    return f"{a['mean']:.2f}"


def markdown(results: dict) -> str:
    rows = results["results"]
    if not rows:  # task checkpoints only: nothing in tokens
        return "# Evaluation results\n\n" + sections_markdown(results).lstrip("\n")
    agg = aggregate(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    train_lens = sorted({c["train_len"] for c in results["checkpoints"] if "task" not in c})  # a task's L: its unit
    seeds = defaultdict(set)
    for r in rows:
        seeds[r["variant"]].add(r["seed"])
    out = ["# Perplexity by evaluation length", ""]
    out.append(
        f"Training length: {', '.join(map(str, train_lens))} tokens. Split: {results['settings']['split']}. "
        "Cells: token perplexity (mean ± standard deviation over seeds where there are several); "
        "the ratio tables divide by the perplexity at the training length."
    )
    for protocol in protocols:
        tokens = sorted({r["tokens"] for r in rows if r["protocol"] == protocol and r["status"] == "ok"})
        out += ["", f"## {protocol}", ""]
        if tokens:
            out.append(f"Tokens scored per cell: {', '.join(f'{t:,}' for t in tokens)}.")
            ks = sorted({(r["target_tokens"], r["tokens"] // r["target_tokens"]) for r in rows
                         if r["protocol"] == protocol and r["status"] == "ok" and r.get("target_tokens")})
            if ks:  # fixed_target: K, lowered from eval.target_tokens to the smallest length when that is shorter
                out[-1] += " Targets: " + "; ".join(f"the last {k} tokens of each of {n} documents" for k, n in ks)
                out[-1] += ", the same at every length."
            out.append("")
        out.append("| variant | seeds | " + " | ".join(f"L={L}" for L in lengths) + " |")
        out.append("|---|---|" + "---|" * len(lengths))
        for v in variants:
            cells = [_cell_text(agg[(v, protocol, L)]) if (v, protocol, L) in agg else "" for L in lengths]
            out.append(f"| {v} | {len(seeds[v])} | " + " | ".join(cells) + " |")
        out += ["", f"Ratio to the training length ({protocol}):", ""]
        out.append("| variant | " + " | ".join(f"L={L}" for L in lengths) + " |")
        out.append("|---|" + "---|" * len(lengths))
        for v in variants:
            cells = []
            for L in lengths:
                a = agg.get((v, protocol, L))
                cells.append(f"{a['ratio_mean']:.2f}×" if a and a["ratio_mean"] is not None
                             else ("n/a" if a and a["status"] == "n/a" else ""))
            out.append(f"| {v} | " + " | ".join(cells) + " |")
    bpb = [r for r in rows if r["status"] == "ok" and r["length"] == r["train_len"]]
    if bpb:
        out += [
            "",
            "## At the training length: bits per byte and word-level perplexity",
            "",
            "| label | protocol | ppl | bits/byte | word ppl | tokens | bytes | words |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bpb:
            out.append(
                f"| {r['label']}{'' if r['rope_scaling'] == 'none' else '+' + r['rope_scaling']} | "
                f"{r['protocol']} | {r['ppl']:.2f} | {r['bits_per_byte']:.3f} | {r['word_ppl']:.2f} | "
                f"{r['tokens']:,} | {r['bytes']:,} | {r['words']:,} |"
            )
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        out += ["", "Skipped cells:", ""]
        for r in skipped:
            out.append(f"- {r['label']} {r['protocol']} L={r['length']}: {r['note']}")
    return "\n".join(out) + "\n" + sections_markdown(results)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    atomic_write(path, buf.getvalue())


# Plots. Each *_figure function builds a matplotlib Figure (tests read its lines and tick labels); plot_* saves it.
# Tick labels are plain numbers (64, 128, 256; 300, 500, 1000; 1.0, 1.5, 2.0): matplotlib's log axes would write
# 2^7 and 3x10^2, which a reader has to decode.

METHOD_COLORS = {"none": "black", "pi": "tab:blue", "ntk": "tab:orange", "dynamic_ntk": "tab:green", "yarn": "tab:red",
                 "llama3": "tab:purple"}
# markers keep coinciding curves apart
METHOD_MARKERS = {"none": "o", "pi": "s", "ntk": "^", "dynamic_ntk": "v", "yarn": "D", "llama3": "P"}
BASE_STYLES = ("-", "--", "-.", ":")  # RoPE scaling panels: one line style per unscaled variant (rope, rope+linear)


def new_figure(n_rows: int, n_cols: int, title: str):
    """A Figure with a grid of axes (rows x columns), drawn without pyplot's global state."""
    from matplotlib.figure import Figure  # heavy (about half a second): imported only when plots are drawn

    fig = Figure(figsize=(4.4 * n_cols + 2.6, 3.4 * n_rows + 0.5), layout="constrained")
    fig.suptitle(title)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _decimals(values) -> int:
    """The fewest decimals that write every value exactly (up to 4)."""
    return next((d for d in range(5) if all(abs(round(v, d) - v) < 1e-9 * max(1.0, abs(v)) for v in values)), 4)


def _set_ticks(axis, ticks) -> None:
    """Major ticks at ``ticks``, labelled as plain numbers with a shared number of decimals; no minor ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    d = _decimals(ticks)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.{d}f}"))
    axis.set_minor_locator(NullLocator())


def _length_ticks(lo: float, hi: float, lengths=(), most: int = 8) -> list[float]:
    """Powers of two in [lo, hi] (every other one, or sparser, past ``most``); the given lengths if fewer than 3."""
    ticks = [2.0**k for k in range(math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9) + 1)]
    if len(ticks) < 3:
        ticks = sorted({float(x) for x in lengths if lo <= x <= hi}) or ticks
    step = math.ceil(len(ticks) / most)
    return ticks[::-1][::step][::-1]  # thinned from the top, so the longest power of two keeps its label


def _log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round numbers for a log axis spanning [lo, hi]: evenly stepped inside a factor of 3, else 1-2-5 style."""
    if hi / lo < 3:
        from matplotlib.ticker import MaxNLocator

        return [float(t) for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8), (1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,)):
        ticks = [float(f"{m * 10.0**e:.6g}") for e in decades for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) <= most:
            return ticks
    return ticks[:: math.ceil(len(ticks) / most)]


def plain_log_axes(ax, lengths) -> None:
    """Freeze the limits of a log-log panel and give both axes plain-number ticks."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    _set_ticks(ax.xaxis, _length_ticks(x0, x1, lengths))
    _set_ticks(ax.yaxis, _log_ticks(y0, y1))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Copies of the rows with ``ratio`` (ppl / ppl at the training length) computed by add_ratios."""
    rows = [dict(r) for r in rows]
    add_ratios(rows)
    return rows


def series_over_seeds(rows: list[dict], field: str) -> dict:
    """(variant, protocol) -> {"lengths", "mean", "std", "seeds", "na"}: ``field`` over seeds at each length."""
    values = defaultdict(lambda: defaultdict(list))
    na = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get(field) is not None:
            values[(r["variant"], r["protocol"])][r["length"]].append(r[field])
        elif r["status"] == "n/a":
            na[(r["variant"], r["protocol"])].append(r["length"])
    out = {}
    for key in values.keys() | na.keys():
        by_len = values.get(key, {})
        lengths = sorted(by_len)
        out[key] = {
            "lengths": np.array(lengths, dtype=float),
            "mean": np.array([np.mean(by_len[L]) for L in lengths]),
            "std": np.array([np.std(by_len[L], ddof=1) if len(by_len[L]) > 1 else 0.0 for L in lengths]),
            "seeds": max((len(v) for v in by_len.values()), default=0),
            "na": sorted(na.get(key, [])),
        }
    return out


def _panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Rows of panels: [(title, [(variant, legend label, line style key)])]: the schemes (siblings such as
    sinusoidal-fairseq beside their family); then, if any variant has a RoPE scaling method, those variants beside
    their unscaled base (rope, rope+linear) in a second row."""
    first = {r["variant"]: r for r in reversed(rows)}  # a row of each variant (they share their fields)
    method = {v: first[v]["rope_scaling"] for v in dict.fromkeys(r["variant"] for r in rows)}
    family = {v: row_family(r) for v, r in first.items()}
    base_of = {v: row_base_variant(r) for v, r in first.items()}
    schemes = [v for v, m in method.items() if m == "none"]
    families = list(dict.fromkeys(family[v] for v in schemes))
    schemes.sort(key=lambda v: families.index(family[v]))  # stable: the order of the results otherwise
    panels = [("schemes", [(v, v, family[v]) for v in schemes])]
    scaled = [v for v, m in method.items() if m != "none"]
    if scaled:
        bases = sorted(dict.fromkeys(base_of[v] for v in scaled), key=lambda b: b.count("+"))  # rope, then rope+linear
        curves = []
        for b in bases:
            if b in method:
                curves.append((b, f"{b} (no scaling)", b))
            curves += [(v, v, b) for v in scaled if base_of[v] == b]
        panels.append(("RoPE scaling, zero-shot", curves))
    return panels


def _curve_styles(panel: str, curves: list, method: dict) -> tuple[dict, dict, dict]:
    """(colour, line style, marker) per variant. Schemes: a colour per family, its siblings dashed. RoPE scaling:
    a colour and marker per method, a line style per unscaled base."""
    import matplotlib  # heavy: imported only when plots are drawn

    keys = list(dict.fromkeys(k for _, _, k in curves))
    if panel == "schemes":
        cmap = matplotlib.colormaps["tab20" if len(keys) > 10 else "tab10"]
        colors = {v: cmap(keys.index(k) % cmap.N) for v, _, k in curves}
        return colors, {v: "-" if v == k else "--" for v, _, k in curves}, {v: "o" for v, _, _ in curves}
    extra = iter(matplotlib.colormaps["tab10"].colors[4:])  # for a method without a colour of its own
    colors = {v: METHOD_COLORS.get(method[v]) or next(extra) for v, _, _ in curves}
    styles = {v: BASE_STYLES[keys.index(k) % len(BASE_STYLES)] for v, _, k in curves}
    return colors, styles, {v: METHOD_MARKERS.get(method[v], "o") for v, _, _ in curves}


def ratio_clip(peaks: list[float]) -> float | None:
    """The top of a ratio panel when a few curves would squash the others against 1, else None. A curve is left
    to run off the top when its peak ratio is beyond both 1.25 and the median peak cubed (in log space: three
    times as far from 1); the top then sits just above the highest curve that stays."""
    logs = [math.log(p) for p in peaks if p > 0 and math.isfinite(p)]
    if not logs:
        return None
    limit = max(math.log(1.25), 3 * float(np.median(logs)))
    kept = [x for x in logs if x <= limit]
    return math.exp(max(kept)) * 1.08 if kept and len(kept) < len(logs) else None


def _draw_panel(ax, curves: list, series: dict, protocol: str, styles: tuple, field: str) -> dict[str, float]:
    """One panel's curves: mean over seeds with a ± std band. Returns each drawn variant's highest mean."""
    colors, lines, markers = styles
    peaks, low = {}, math.inf
    for v, label, _ in curves:
        s = series.get((v, protocol))
        if s is None or not len(s["lengths"]):
            continue
        xs, m, sd = s["lengths"], s["mean"], s["std"]
        if s["na"]:
            label += f" (n/a beyond {int(xs.max())})"
        ax.plot(xs, m, lines[v], marker=markers[v], ms=3.5, lw=1.4, color=colors[v], label=label)
        if s["seeds"] > 1:  # the band never reaches zero, which a log axis cannot show
            ax.fill_between(xs, np.maximum(m - sd, m / 2), m + sd, color=colors[v], alpha=0.15, lw=0)
        peaks[v] = float(np.max(m))
        low = min(low, float(np.min(np.maximum(m - sd, m / 2))))
    top = ratio_clip(list(peaks.values())) if field == "ratio" else None
    if top is not None:  # a curve far above the rest runs off the top; say where it went
        off = [f"{v} (up to {p:.3g}×)" for v, p in peaks.items() if p > top]
        ax.set_ylim(low / 1.02, top)
        ax.text(0.02, 0.97, "off the top: " + ", ".join(off), transform=ax.transAxes, va="top", fontsize=7,
                color="dimgrey")  # fmt: skip
    return peaks


def _length_figure(results: dict, rows: list[dict], field: str, ylabel: str, title: str, protocols=None):
    """``field`` (ppl or ratio) against evaluation length: a column per protocol, a row of panels per _panels.
    Ratio panels clip a curve far above the rest (ratio_clip) and name it, so it does not flatten the others."""
    series = series_over_seeds(rows, field)
    protocols = list(protocols or dict.fromkeys(r["protocol"] for r in rows))
    panels = _panels(rows)
    method = {r["variant"]: r["rope_scaling"] for r in rows}
    lengths = sorted({r["length"] for r in rows})
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    fig, axes = new_figure(len(panels), len(protocols), title)
    for (panel, curves), row_axes in zip(panels, axes, strict=True):
        styles = _curve_styles(panel, curves, method)
        for ax, protocol in zip(row_axes, protocols, strict=True):
            ax.set_title(f"{protocol}: {panel}", fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # before drawing, so the limits are found (and clipped) in log space
            if not _draw_panel(ax, curves, series, protocol, styles, field):
                ax.text(0.5, 0.5, "no scored cells", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for tl in train_lens:
                ax.axvline(tl, color="grey", ls=":", lw=1)
            if field == "ratio":
                ax.axhline(1.0, color="grey", lw=0.8)
            plain_log_axes(ax, lengths)
            ax.set_xlabel("evaluation length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        handles, labels = next(((h, lb) for h, lb in (ax.get_legend_handles_labels() for ax in row_axes) if h),
                               ([], []))  # fmt: skip
        if handles:
            row_axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                                frameon=False)  # fmt: skip
    return fig


def ppl_vs_length_figure(results: dict):
    """Perplexity against evaluation length, mean with a std band over seeds (log-log, plain tick labels)."""
    title = "Perplexity by evaluation length (mean ± std over seeds; dotted: training length)"
    return _length_figure(results, results["results"], "ppl", "perplexity", title)


def ppl_ratio_figure(results: dict, protocols: list[str] | None = None):
    """Perplexity / perplexity at the training length on a log-2 length axis, per variant: mean with a ± std band
    over seeds; the schemes in one row of panels, the RoPE scalings beside plain RoPE in another; a column per
    protocol (all of them, or ``protocols``)."""
    title = "Perplexity per token / perplexity at the training length\n(mean ± std over seeds; dotted: training length)"
    rows = _with_ratios(results["results"])
    return _length_figure(results, rows, "ratio", "ppl / ppl at the training length", title, protocols)


def has_ratios(results: dict) -> bool:
    """Whether any cell has a perplexity at its training length to divide by (else there is no ratio plot)."""
    return any(r["ratio"] is not None for r in _with_ratios(results["results"]))


def per_position_figure(results: dict, bins: int = 24):
    """Mean loss at each window position (log-spaced buckets), for the variants without RoPE scaling."""
    import matplotlib  # heavy: imported only when plots are drawn

    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    curves = defaultdict(list)  # variant -> its per-position records (seeds), without the RoPE scaling variants
    for p in results["per_position"]:
        if p["rope_scaling"] == "none":
            curves[p["variant"]].append(p)
    fig, axes = new_figure(1, 1, "Per-position loss, nonoverlapping windows (dotted: training length)")
    ax = axes[0][0]
    fig.set_size_inches(9, 4.5)
    cmap = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"]
    for i, (v, ps) in enumerate(curves.items()):
        L = max(p["length"] for p in ps)
        arrs = np.array([p["mean_loss"] for p in ps if p["length"] == L])  # seeds
        m = arrs.mean(axis=0)
        edges = np.unique(np.geomspace(1, L, bins).astype(int))  # log-spaced buckets of positions
        xs, ys = [], []
        for a, b in zip(np.r_[0, edges[:-1]], edges, strict=True):
            if b > a:
                xs.append((a + b - 1) / 2 + 1)
                ys.append(m[a:b].mean())
        ax.plot(xs, ys, color=cmap(i % cmap.N), label=f"{v} (L={L})")
    for tl in train_lens:
        ax.axvline(tl, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    x0, x1 = ax.get_xlim()
    _set_ticks(ax.xaxis, _length_ticks(x0, x1))
    ax.set_xlim(x0, x1)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_xlabel("position in the window (token index, log scale)")
    ax.set_ylabel("mean loss (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return fig


def plot_ppl_vs_length(results: dict, path: Path) -> None:
    save_fig(ppl_vs_length_figure(results), path)


def plot_ppl_ratio(results: dict, path: Path, protocols: list[str] | None = None) -> None:
    save_fig(ppl_ratio_figure(results, protocols), path)


def plot_per_position(results: dict, path: Path, bins: int = 24) -> None:
    save_fig(per_position_figure(results, bins), path)


def save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """Every output file, each written atomically; returns their paths. The ratio plot needs a cell at the
    training length, the per-position plot per-position records: each is left out without them."""
    (out_dir := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    writers = {
        "results.json": lambda p: atomic_write(p, json.dumps(results, indent=1, default=_json_default) + "\n"),
        "results.csv": lambda p: write_csv(p, results["results"]),
        "results.md": lambda p: atomic_write(p, markdown(results)),
    }
    if results["results"]:  # task checkpoints alone have no perplexity to plot
        writers["ppl_vs_length.png"] = lambda p: plot_ppl_vs_length(results, p)
    if has_ratios(results):  # needs a perplexity at the training length to divide by
        writers["ppl_ratio_vs_length.png"] = lambda p: plot_ppl_ratio(results, p)
    if results["per_position"]:
        writers["per_position.png"] = lambda p: plot_per_position(results, p)
    for name, write in writers.items():
        write(out_dir / name)
    return [out_dir / name for name in writers]


def _json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def terminal_summary(results: dict) -> str:
    """What evaluate.py prints: one :func:`terminal_table` per protocol that was scored, in the order the results
    hold them (the order asked), so ``eval.protocols=[sliding]`` shows its sliding table; then every probe's, then
    the tasks' (:func:`roformer.probe_report.sections_terminal`)."""
    protocols = list(dict.fromkeys(r["protocol"] for r in results["results"]))
    tables = [terminal_table(results, p) for p in protocols]
    if not tables and not results.get("tasks"):  # task checkpoints alone have no perplexity to miss
        tables = ["no perplexity cells were scored"]
    return "\n\n".join(tables + sections_terminal(results))


def scored_line(results: dict) -> str:
    """How much evaluate.py scored, for its last line: perplexity cells (unless task checkpoints were all there
    was), then task checkpoints."""
    rows, tasks = results["results"], results.get("tasks") or []
    parts = []
    if rows or not tasks:
        parts.append(f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} cells scored")
    if tasks:
        n = len({r["label"] for r in tasks})
        parts.append(f"{n} task checkpoint{'s' if n > 1 else ''} scored ({len(tasks)} length bins)")
    return "; ".join(parts)


def terminal_table(results: dict, protocol: str = "nonoverlapping") -> str:
    """The compact summary evaluate.py prints: perplexity and its ratio to the perplexity at the training length,
    by variant (rows) and length (columns), for one protocol, mean over seeds. results.md has the rest."""
    rows = [r for r in results["results"] if r["protocol"] == protocol]
    if not rows:
        return f"no {protocol} cells were scored"
    agg = aggregate(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    seeds = defaultdict(set)
    for r in rows:
        seeds[r["variant"]].add(r["seed"])
    tokens = sorted({r["tokens"] for r in rows if r["status"] == "ok"})

    def text(a: dict | None, field: str) -> str:
        if a is None:
            return ""
        if a["status"] != "ok":
            return a["status"]  # n/a | skipped
        x = a[field]
        if x is None:
            return "-"
        return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"

    table = [["variant", "seeds", "", *(f"L={L}" for L in lengths)]]
    for v in variants:
        cells = [agg.get((v, protocol, L)) for L in lengths]
        table.append([v, str(len(seeds[v])), "ppl", *(text(a, "mean") for a in cells)])
        table.append(["", "", "ratio", *(text(a, "ratio_mean") for a in cells)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        f"{protocol} perplexity, mean over seeds, and its ratio to the perplexity at the training length; "
        + (f"{', '.join(f'{t:,}' for t in tokens)} tokens per cell" if tokens else "no cell scored")
    ]
    for r in table:  # names left-aligned, numbers right-aligned
        cols = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cols).rstrip())
    notes = {(r["variant"], r["note"]) for r in rows if r["status"] == "n/a" and r["note"]}
    lines += [f"n/a: {v} {note.removeprefix('n/a ')}" for v, note in sorted(notes)]
    return "\n".join(lines)
