"""The extension study's report: RoPE checkpoints trained at L, fine-tuned at 4 L, against zero-shot extension.

``python scripts/run_study.py --preset extension`` fine-tunes the RoPE checkpoints at 4 L with four methods and
evaluates everything at lengths L to 32 L. Its variants, as :func:`roformer.eval_run.variant_name` names them:

* zero-shot, on the base checkpoints (train_len L): ``rope``, ``rope+pi``, ``rope+ntk``, ``rope+yarn``
  (``rope+dynamic_ntk``), the method applied at evaluation with factor length / L;
* fine-tuned at 4 L (train_len 4 L), ``-ft``: ``rope-ft`` (no scaling: plain extrapolation to 4 L), ``rope+pi-ft``,
  ``rope+ntk-ft``, ``rope+yarn-ft``;
* fine-tuned, then zero-shot beyond 4 L: ``rope-ft+pi``, ``rope-ft+ntk``, ``rope-ft+yarn``, ``rope-ft+dynamic_ntk``.

Its tables hold perplexity per token, not ratios to L: a fine-tuned model is another model than its base, so each
one's ratio to its own perplexity at its own training length would not compare. Mean ± std over seeds, the lowest
mean at each length in bold. A row's kind and method come from its fields (``fine_tuned``, ``rope_scaling``,
``train_scaling``), not from its name (files written before the fields: :func:`roformer.result_rows.row_fine_tuned`).
"""

from __future__ import annotations

import math

import numpy as np

from roformer.positional import RopeScaling
from roformer.reporting import (
    METHOD_COLORS,
    METHOD_MARKERS,
    aggregate,
    new_figure,
    plain_log_axes,
    save_fig,
    series_over_seeds,
)
from roformer.result_rows import row_fine_tuned

SCALINGS = tuple(k.value for k in RopeScaling if k != RopeScaling.none)  # the RoPE scaling methods
EXTENSION_PLOT = "extension_ppl.png"
KINDS = ("zero-shot", "fine-tuned", "fine-tuned + zero-shot")
KIND_STYLES = {"zero-shot": "--", "fine-tuned": "-", "fine-tuned + zero-shot": "-."}


def is_extension(results: dict) -> bool:
    """Whether a study's results hold fine-tuned checkpoints (trainer.init_from): the extension study."""
    return any(row_fine_tuned(r) for r in results["results"])


def kind(row: dict) -> str:
    """zero-shot (a base checkpoint), fine-tuned, or fine-tuned + zero-shot (a method applied to rope-ft)."""
    if not row_fine_tuned(row):
        return KINDS[0]
    return KINDS[1] if row["rope_scaling"] == "none" else KINDS[2]


def method(row: dict) -> str:
    """The RoPE scaling method a row's model uses, at evaluation (``rope-ft+pi``, ``rope+pi``) or as trained
    (``rope+pi-ft``): pi; none without one (``rope+abf-ft`` too: a larger base is no scaling method)."""
    if row["rope_scaling"] != "none":
        return row["rope_scaling"]
    if "train_scaling" in row:
        return row["train_scaling"]
    last = row["variant"].rsplit("+", 1)[-1].removesuffix("-ft")  # a file written before rows had the field
    return last if last in SCALINGS else "none"


def _variants(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """variant -> (kind, method), by kind, then by method in METHOD_COLORS' order (none, pi, ntk, dynamic_ntk,
    yarn)."""
    info = {r["variant"]: (kind(r), method(r)) for r in rows}  # the rows of a variant share their fields
    order = list(METHOD_COLORS)
    rank = {v: (KINDS.index(k), order.index(m) if m in order else 99) for v, (k, m) in info.items()}
    return {v: info[v] for v in sorted(info, key=rank.get)}  # stable: in the order of the rows otherwise


def _lengths(results: dict) -> tuple[int, int, list[int]]:
    """(L, the fine-tuning length, every evaluated length)."""
    train_lens = sorted({r["train_len"] for r in results["results"]})
    return train_lens[0], train_lens[-1], sorted({r["length"] for r in results["results"]})


def _num(x: float, like: float | None = None) -> str:
    """One decimal, none from 1,000 on (of ``like``, if given: a std is written as its mean is)."""
    return f"{x:,.0f}" if (x if like is None else like) >= 1000 else f"{x:.1f}"


def _cell(a: dict | None, best: float | None) -> str:
    if a is None:
        return ""
    if a["status"] != "ok":
        return "n/a" if a["status"] == "n/a" else "–"
    text = _num(a["mean"]) + (f" ± {_num(a['std'], a['mean'])}" if a["n"] > 1 else "")
    return f"**{text}**" if a["mean"] == best else text


def ppl_table(rows: list[dict], protocol: str, lengths: list[int], base_len: int) -> list[str]:
    """One protocol's perplexities (per token): a row per variant, a column per length, the best mean in bold."""
    agg = aggregate([r for r in rows if r["protocol"] == protocol])
    info = _variants(rows)
    variants = [v for v in info if any((v, protocol, n) in agg for n in lengths)]
    best = {}
    for n in lengths:
        means = [a["mean"] for v in variants if (a := agg.get((v, protocol, n))) and a["status"] == "ok"]
        best[n] = min(means, default=None)
    out = ["| variant | kind | " + " | ".join(f"{n:,} ({n / base_len:g} L)" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]  # fmt: skip
    for v in variants:
        cells = [_cell(agg.get((v, protocol, n)), best[n]) for n in lengths]
        out.append(f"| {v} | {info[v][0]} | " + " | ".join(cells) + " |")
    return out


def winners(rows: list[dict], protocol: str, lengths: list[int], zero_shot_only: bool = False) -> tuple[str, float]:
    """(variant, its geometric-mean perplexity over ``lengths``): the lowest among the variants scored at every
    one of them (only the zero-shot ones if asked); ("", nan) if none is."""
    agg = aggregate([r for r in rows if r["protocol"] == protocol])
    scores = {}
    for v, (k, _) in _variants(rows).items():
        cells = [agg.get((v, protocol, n)) for n in lengths]
        if (not zero_shot_only or k == KINDS[0]) and lengths and all(a and a["status"] == "ok" for a in cells):
            scores[v] = math.exp(float(np.mean([math.log(a["mean"]) for a in cells])))
    best = min(scores, key=scores.get, default="")
    return best, scores.get(best, math.nan)


def _winner_table(rows: list[dict], protocols: list[str], lengths: list[int], ft_len: int, base_len: int):
    ranges = {f"≤ {ft_len / base_len:g} L": [n for n in lengths if n <= ft_len],
              f"beyond {ft_len / base_len:g} L": [n for n in lengths if n > ft_len]}  # fmt: skip
    head = [f"{name}: {who}" for name in ranges for who in ("best", "best zero-shot")]
    out = ["| protocol | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for protocol in protocols:
        cells = []
        for span in ranges.values():
            for zero_shot in (False, True):
                v, score = winners(rows, protocol, span, zero_shot)
                cells.append(f"{v} ({_num(score)})" if v else "–")
        out.append(f"| {protocol} | " + " | ".join(cells) + " |")
    return out


def extension_markdown(results: dict, header: list[str] | None = None) -> str:
    """The extension study's report (markdown); ``header``: the study record's table (study_report.study_header)."""
    rows = results["results"]
    base_len, ft_len, lengths = _lengths(results)
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    tokens = {c["train_len"]: c.get("tokens_seen") for c in results["checkpoints"]}
    seen = ", ".join(f"{t:,} (train_len {n})" for n, t in sorted(tokens.items()) if t) or "?"
    m = f"{ft_len / base_len:g} L"
    out = ["# RoPE context extension: zero-shot against fine-tuned at " + m, "", *(header or [])]
    out += [
        f"Base checkpoints: RoPE trained at L = {base_len}; fine-tuned at {ft_len} = {m}. Seeds "
        f"{', '.join(map(str, seeds))}; tokens seen per run: {seen}; evaluated on the "
        f"{results['settings']['split']} split.",
        "",
        "- **zero-shot**: a base checkpoint, the method applied at evaluation with factor length / L;",
        f"- **fine-tuned**: fine-tuned at {m} with the method (rope-ft: none, plain extrapolation);",
        f"- **fine-tuned + zero-shot**: rope-ft, with the method applied at evaluation beyond {ft_len}.",
        "",
        "Cells: perplexity per token, absolute (not a ratio to L: a fine-tuned model is another model than its "
        "base), mean ± std over seeds; bold: the lowest mean at each length.",
        "",
        f"## Winners at ≤ {m} and beyond {m}",
        "",
        "The variant with the lowest geometric mean of its perplexities over the lengths of the range, among those "
        "scored at all of them, with that mean; zero-shot: the best without fine-tuning.",
        "",
        *_winner_table(rows, protocols, lengths, ft_len, base_len),
        "",
    ]
    for protocol in protocols:
        out += [f"## {protocol} (perplexity per token)", "", *ppl_table(rows, protocol, lengths, base_len), ""]
    out += [f"![perplexity against length, zero-shot and fine-tuned]({EXTENSION_PLOT})", ""]
    return "\n".join(out)


def extension_figure(results: dict):
    """Perplexity per token against length (log-2 x, log y), a panel per protocol: zero-shot dashed, fine-tuned
    solid, fine-tuned + zero-shot dash-dotted, a colour per method; mean with a ± std band over seeds."""
    rows = results["results"]
    base_len, ft_len, lengths = _lengths(results)
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    series = series_over_seeds(rows, "ppl")
    info = _variants(rows)
    title = (f"RoPE extension: perplexity per token by length (mean ± std over seeds)\n"
             f"dashed: zero-shot; solid: fine-tuned at {ft_len}; dash-dot: fine-tuned + zero-shot; "
             f"vertical line: {ft_len / base_len:g} L")  # fmt: skip
    fig, axes = new_figure(1, len(protocols), title)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for v, (k, m) in info.items():
            s = series.get((v, protocol))
            if s is None or not len(s["lengths"]):
                continue
            color = METHOD_COLORS.get(m, "tab:purple")
            ax.plot(s["lengths"], s["mean"], KIND_STYLES[k], marker=METHOD_MARKERS.get(m, "o"),
                    ms=3.5, lw=1.4, color=color, label=v)  # fmt: skip
            if s["seeds"] > 1:
                ax.fill_between(s["lengths"], np.maximum(s["mean"] - s["std"], s["mean"] / 2), s["mean"] + s["std"],
                                color=color, alpha=0.12, lw=0)  # fmt: skip
        ax.axvline(ft_len, color="grey", lw=1.2)
        ax.axvline(base_len, color="grey", ls=":", lw=1)
        plain_log_axes(ax, lengths)
        ax.set_title(protocol, fontsize=10)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity per token")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return fig


def plot_extension(results: dict, path) -> None:
    save_fig(extension_figure(results), path)
