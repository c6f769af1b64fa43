"""Evaluation results -> results.json / results.csv / results.md and PNG plots (the dashboard is logger.py's).

``results.json`` (format ``roformer-eval`` version 1)::

    {"format": {"name": "roformer-eval", "version": 1},
     "settings": {...eval settings...},
     "checkpoints": [{"label", "path", "scheme", "attention", "variant", "seed", "train_len", "step",
                      "tokens_seen", "group", "config": {"model", "pos", "train"}, "data": {...}, "split_tokens",
                      "split_docs"}],
     "results": [{"label", "variant", "scheme", "rope_scaling", "seed", "train_len", "protocol", "length",
                  "status": "ok" | "n/a" | "skipped", "note", "ppl", "nll_sum", "tokens", "bytes", "words",
                  "bits_per_byte", "word_ppl", "ratio"}],          # ratio: ppl / ppl at the training length
     "per_position": [{"label", "variant", "rope_scaling", "length", "mean_loss": [...]}]}

A *variant* is what a reader compares: the scheme, "+linear" for linear attention, "+<method>" for a RoPE
scaling method. Seeds of one variant are aggregated (mean and standard deviation) in the markdown and plots.

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
            out[key] = {
                "mean": None,
                "std": None,
                "n": 0,
                "ratio_mean": None,
                "status": rs[0]["status"],
                "note": rs[0]["note"],
            }
    return out


def _cell_text(a: dict) -> str:
    if a["status"] != "ok":
        return a["note"] if a["status"] == "n/a" else "skipped"
    if a["n"] > 1:
        return f"{a['mean']:.2f} ± {a['std']:.2f}"
    return f"{a['mean']:.2f}"


def markdown(results: dict) -> str:
    rows = results["results"]
    agg = aggregate(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
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
                cells.append(
                    f"{a['ratio_mean']:.2f}×"
                    if a and a["ratio_mean"] is not None
                    else ("n/a" if a and a["status"] == "n/a" else "")
                )
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
    return "\n".join(out) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    atomic_write(path, buf.getvalue())


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib  # heavy (about half a second): imported only when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_length(results: dict, path: Path) -> None:
    plt = _pyplot()
    rows = results["results"]
    agg = aggregate(rows)
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for i, v in enumerate(variants):
            pts = sorted((L, a) for (vv, p, L), a in agg.items() if vv == v and p == protocol)
            ok = [(L, a) for L, a in pts if a["status"] == "ok"]
            label = v
            na = [L for L, a in pts if a["status"] == "n/a"]
            if na:
                label += f" (n/a beyond {max(L for L, _ in ok)})" if ok else " (n/a)"
            if not ok:
                continue
            xs = np.array([L for L, _ in ok])
            ys = np.array([a["mean"] for _, a in ok])
            sd = np.array([a["std"] for _, a in ok])
            style = "--" if "+" in v and v.split("+", 1)[1] in ("pi", "ntk", "dynamic_ntk", "yarn") else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, color=cmap(i % cmap.N), label=label)
            if any(a["n"] > 1 for _, a in ok):
                ax.fill_between(xs, ys - sd, ys + sd, color=cmap(i % cmap.N), alpha=0.2)
        for tl in train_lens:
            ax.axvline(tl, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{protocol} (dotted: training length)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    _save_fig(fig, path)
    plt.close(fig)


def plot_per_position(results: dict, path: Path, bins: int = 24) -> None:
    plt = _pyplot()
    per = results["per_position"]
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    curves = defaultdict(list)  # variant -> its per-position records (seeds), without the RoPE scaling variants
    for p in per:
        if p["rope_scaling"] == "none":
            curves[p["variant"]].append(p)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
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
    ax.set_xlabel("position in the window (token index, log scale)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title("Per-position loss, nonoverlapping windows (dotted: training length)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """Every output file, each written atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / n for n in ("results.json", "results.csv", "results.md", "ppl_vs_length.png", "per_position.png")
    ]
    atomic_write(paths[0], json.dumps(results, indent=1, default=_json_default) + "\n")
    write_csv(paths[1], results["results"])
    atomic_write(paths[2], markdown(results))
    plot_ppl_vs_length(results, paths[3])
    if results["per_position"]:
        plot_per_position(results, paths[4])
    else:
        paths.pop()
    return paths


def _json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
