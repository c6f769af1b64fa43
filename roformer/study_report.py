"""The study's comparison report: ratio tables with mean ± std over seeds, beside the ALiBi paper's ratios.

Built from an evaluation's ``results.json`` and the study's ``study.json`` (command, commit, machine, wall
times; see ``scripts/run_study.py``). Everything in it is computed from those two files, so the report can be
rebuilt at any time with ``python scripts/study_report.py <study folder>``. A study of fine-tuned RoPE checkpoints
(``run_study.py --preset extension``: rows with ``fine_tuned``) gets the report of
:mod:`roformer.extension_report` instead.

Perplexities are per BPE token, except beside the ALiBi paper: its WikiText-103 perplexities are per word, and a
ratio between two lengths grows with the number of tokens per word (the word-level ratio is the token-level one
raised to tokens / words), so that table compares word-level ratios.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from roformer.extension_report import EXTENSION_PLOT, extension_markdown, is_extension, plot_extension
from roformer.files import atomic_write
from roformer.reporting import aggregate, has_ratios, plot_ppl_ratio
from roformer.result_rows import row_family
from roformer.task_report import write_task_report

# Press, Smith & Lewis (2022), "Train Short, Test Long" (ALiBi): the WikiText-103 extrapolation results (Figure 1
# and its table of perplexities in the appendix), trained at L = 512, nonoverlapping evaluation, perplexity per
# word. At about m L (the paper's 1012, 2512 and 12512 tokens for m = 2, 5, 24): the two perplexities the table
# gives, (at m L, at L), where we have them, so that the ratio is computed; otherwise the ratio read from it.
PAPER = "Press et al. (2022), WikiText-103, L = 512, nonoverlapping, perplexity per word"
PAPER_RATIOS: dict[str, dict[int, float | tuple[float, float]]] = {
    "sinusoidal": {2: 2.2, 5: 6.6, 24: 18.6},
    "rope": {2: (21.37, 20.07), 5: 1.57, 24: 3.5},
    "alibi": {2: 0.95, 5: 0.93, 24: 0.93},
}
# Our variant -> the paper's model it stands beside. The paper's sinusoidal model is fairseq's form (token
# embeddings times sqrt(d_model), the sinusoid added unscaled): sinusoidal-fairseq here; ours scales the table.
PAPER_ROWS = {"sinusoidal": "sinusoidal", "sinusoidal-fairseq": "sinusoidal", "rope": "rope", "alibi": "alibi"}
# The paper's 247M-parameter model trained for 205 epochs of WikiText-103's 103,227,021 training tokens.
PAPER_TOKENS = 205 * 103_227_021
PLOTS = {  # file -> what it shows, in the order the report embeds them
    "ppl_ratio.png": "perplexity per token relative to L, nonoverlapping",
    "ppl_vs_length.png": "perplexity per token against evaluation length",
    "per_position.png": "per-position loss",
}


def paper_ratio(scheme: str, mult: int) -> float:
    """The paper's perplexity at about ``mult`` L over its perplexity at L."""
    entry = PAPER_RATIOS[scheme][mult]
    return entry[0] / entry[1] if isinstance(entry, tuple) else entry


def _paper_text(scheme: str, mult: int) -> str:
    """The paper's ratio as precisely as it is known: 3 decimals when computed from its perplexities."""
    entry = PAPER_RATIOS[scheme][mult]
    return f"{entry[0] / entry[1]:.3f}" if isinstance(entry, tuple) else f"{entry:g}"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def ratio_stats(rows: list[dict], protocol: str, field: str = "ppl") -> dict[tuple[str, float], dict]:
    """(variant, multiplier) -> {"mean", "std", "n", "ratios"} over seeds of ``field`` (ppl, per token; or
    word_ppl) divided by that checkpoint's ``field`` at L, or a status note.

    The multiplier is length / train_len. A ratio is taken within one checkpoint and RoPE scaling (label,
    rope_scaling). Cells where a checkpoint could not be scored (learned beyond its table) carry ``status`` "n/a"
    and their note.
    """
    base = {(r["label"], r["rope_scaling"]): r[field] for r in rows
            if r["protocol"] == protocol and r["status"] == "ok" and r["length"] == r["train_len"]}  # fmt: skip
    groups = defaultdict(list)
    for r in rows:
        if r["protocol"] == protocol:
            groups[(r["variant"], r["length"] / r["train_len"])].append(r)
    out = {}
    for key, rs in groups.items():
        ratios = []
        for r in rs:
            b = base.get((r["label"], r["rope_scaling"]))
            if r["status"] == "ok" and _finite(r.get(field)) and _finite(b) and b > 0:
                ratios.append(r[field] / b)
        if ratios:
            a = np.array(ratios)
            std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            out[key] = {"status": "ok", "mean": float(a.mean()), "std": std, "n": len(a), "ratios": ratios}
        else:  # n/a (learned beyond its table), skipped (text too short), or no score at L to divide by
            bad = next((r for r in rs if r["status"] != "ok"), None)
            out[key] = {"status": bad["status"], "note": bad["note"]} if bad else {"status": "no ratio", "note": ""}
            out[key]["n"] = 0
    return out


def _mult(m: float) -> str:
    return f"{m:g} L"


def _ratio(a: dict | None, std: bool = True, digits: int = 2) -> str:
    if a is None:
        return ""
    if a["status"] != "ok":
        return "n/a" if a["status"] == "n/a" else "–"
    if std and a["n"] > 1:
        return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"
    return f"{a['mean']:.{digits}f}×"


def nearest(available: list[float], target: float) -> float:
    """The available multiplier closest to target on a log scale."""
    return min(available, key=lambda m: abs(math.log(m / target)))


def _order(variants: list[str], stats: dict, last: float, family: dict[str, str]) -> list[str]:
    """Variants sorted by their mean ratio at the longest length, those without one (n/a) last; a variant's
    siblings (learned-32L, sinusoidal-fairseq: ``family``, variant -> its family) stay beside it, where the best
    one of them would sort."""

    def key(v):
        a = stats.get((v, last))
        return (0, a["mean"]) if a and a["status"] == "ok" else (1, 0.0)

    best = {}
    for v in variants:
        best[family[v]] = min(best.get(family[v], key(v)), key(v))
    return sorted(variants, key=lambda v: (best[family[v]], family[v], key(v)))


def _families(rows: list[dict]) -> dict[str, str]:
    """variant -> its family (result_rows.row_family)."""
    return {r["variant"]: row_family(r) for r in rows}


def study_header(study: dict) -> list[str]:
    """run_study.py's record as a table: command, commit, machine, wall time, preset, failures."""
    wall = study.get("wall_seconds")
    out = [
        "| | |",
        "|---|---|",
        f"| command | `{study.get('command', '?')}` |",
        f"| commit | `{study.get('commit', '?')}` |",
        f"| machine | {study.get('machine', '?')} |",
        (
            f"| wall time | {wall / 60:.1f} min (training {study['train_seconds'] / 60:.1f} min, "
            f"evaluation {study['eval_seconds'] / 60:.1f} min) |"
            if wall is not None
            else "| wall time | ? |"
        ),
        f"| preset | {study.get('preset', '?')} |",
        "",
    ]
    failed = [r["run"] for r in study.get("runs", []) if r.get("exit_code")]
    if failed or study.get("eval_exit_code"):
        out += [f"**Failures:** runs {failed}, evaluation exit code {study.get('eval_exit_code')}.", ""]
    return out


def _tokens_seen(results: dict) -> list[int]:
    return sorted({c["tokens_seen"] for c in results["checkpoints"] if c.get("tokens_seen")})


def _intro(results: dict) -> list[str]:
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    seeds = sorted({c["seed"] for c in results["checkpoints"]})
    model = results["checkpoints"][0]["config"]["model"]
    return [
        f"Training length L = {', '.join(map(str, train_lens))}; seeds {', '.join(map(str, seeds))}; "
        f"{', '.join(f'{t:,}' for t in _tokens_seen(results))} training tokens per run; model "
        f"{model.get('n_layer')} layers, d_model {model.get('d_model')}, {model.get('n_head')} heads; evaluated "
        f"on the {results['settings']['split']} split.",
        "Perplexity is per BPE token, except beside the ALiBi paper (word-level, as the paper's). Ratios are "
        "perplexity at each length divided by perplexity at L, per seed, then mean ± standard deviation over seeds.",
        "",
    ]


def _headline(rows: list[dict], nono: dict, variants: list[str], longer: list[float]) -> list[str]:
    """Nonoverlapping ratios to L (per token), a row per variant, sorted by the ratio at the longest length."""
    agg = aggregate(rows)  # ppl mean and std over seeds per (variant, protocol, length)
    train_len = {r["variant"]: r["train_len"] for r in rows}
    out = ["## Perplexity ratio to L, nonoverlapping (per token)", ""]
    out.append("| variant | ppl per token at L | " + " | ".join(_mult(m) for m in longer) + " |")
    out.append("|---|---|" + "---|" * len(longer))
    for v in _order(variants, nono, longer[-1], _families(rows)) if longer else variants:
        a = agg.get((v, "nonoverlapping", train_len[v]))
        ppl = ""
        if a and a["status"] == "ok":
            ppl = f"{a['mean']:.1f}" + (f" ± {a['std']:.1f}" if a["n"] > 1 else "")
        out.append(f"| {v} | {ppl} | " + " | ".join(_ratio(nono.get((v, m))) for m in longer) + " |")
    return out + [""]


def _fixed_vs_nonoverlapping(rows: list[dict], nono: dict, variants: list[str], longer: list[float]) -> list[str]:
    """Fixed-target ratios beside nonoverlapping ones (means, per token), for the variants without RoPE scaling."""
    fixed = ratio_stats(rows, "fixed_target")
    tt = sorted({r["tokens"] for r in rows if r["protocol"] == "fixed_target" and r["status"] == "ok"})
    out = [
        "## Fixed-target against nonoverlapping (per token)",
        "",
        f"Fixed-target scores the same {', '.join(f'{t:,}' for t in tt)} target tokens at every length, "
        "with more context before them; the cell is its ratio to L beside the nonoverlapping one "
        "(fixed-target / nonoverlapping, means over seeds).",
        "",
        "| variant | " + " | ".join(_mult(m) for m in longer) + " |",
        "|---|" + "---|" * len(longer),
    ]
    scaled = {r["variant"] for r in rows if r["rope_scaling"] != "none"}  # scored with a zero-shot scaling
    for v in _order([v for v in variants if v not in scaled], fixed, longer[-1], _families(rows)):
        cells = []
        for m in longer:
            f, n = fixed.get((v, m)), nono.get((v, m))
            cells.append(
                f"{_ratio(f, std=False)} / {_ratio(n, std=False)}"
                if f and n and f["status"] == n["status"] == "ok"
                else ("n/a" if (f or n) else "")
            )
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out + [""]


def _scale_note(results: dict) -> str:
    """How many times our training tokens the paper's model saw."""
    ours = _tokens_seen(results)
    times = ", ".join(f"{float(f'{PAPER_TOKENS / t:.2g}'):,.0f}× the {t:,} tokens" for t in ours)
    paper = f"about {PAPER_TOKENS / 1e10:.1f}×10^10 tokens"
    tail = f": some {times} of each run here." if ours else "."
    return f"The paper's 247M-parameter model trained for 205 epochs of WikiText-103, {paper}{tail}"


def _paper_table(results: dict, longer: list[float]) -> list[str]:
    """Our word-level ratios at the lengths nearest the paper's ~2 L, ~5 L, ~24 L, beside the paper's."""
    rows = results["results"]
    words = ratio_stats(rows, "nonoverlapping", field="word_ppl")
    at_l = [r for r in rows if r["protocol"] == "nonoverlapping" and r["status"] == "ok"
            and r["length"] == r["train_len"] and r.get("words")]  # fmt: skip
    per_word = sum(r["tokens"] for r in at_l) / sum(r["words"] for r in at_l) if at_l else None
    targets = sorted({m for ratios in PAPER_RATIOS.values() for m in ratios})
    ours = [nearest(longer, t) for t in targets]
    out = [
        f"## Beside the ALiBi paper ({PAPER})",
        "",
        "Word-level, as the paper's: word perplexity (the summed loss of the scored tokens over the number of "
        "words their text holds, exponentiated) at each length over word perplexity at L, per seed, then mean ± "
        "std over seeds. A ratio between two lengths grows with the number of tokens per word (the word-level "
        "ratio is the per-token one to the power tokens / words"
        + (f"; {per_word:.2f} tokens per word here" if per_word else "")
        + "), so the per-token tables above do not compare with the paper.",
        "",
        _scale_note(results)
        + " The paper's sinusoidal model is fairseq's form (sinusoidal-fairseq here); ours scales the table by "
        "d_model^-0.5 instead.",
        "",
        "Each cell: ours (word-level, mean ± std over seeds) / the paper's.",
        "",
        "| variant | " + " | ".join(f"{_mult(o)} / ~{t} L" for o, t in zip(ours, targets, strict=True)) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for variant, scheme in PAPER_ROWS.items():
        cells = []
        for o, t in zip(ours, targets, strict=True):
            a = words.get((variant, o))
            ours_text = _ratio(a, digits=3) if a else "(not run)"
            cells.append(f"{ours_text} / {_paper_text(scheme, t)}")
        out.append(f"| {variant} | " + " | ".join(cells) + " |")
    return out + [""]


def study_markdown(results: dict, study: dict | None = None, plots: list[str] | None = None) -> str:
    """The comparison report (markdown). ``study`` is run_study.py's record; without it the header is skipped.
    ``plots``: the image files beside the report to embed (default: all of PLOTS)."""
    rows = results["results"]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    longer = [m for m in sorted({r["length"] / r["train_len"] for r in rows}) if m > 1]
    out = ["# Train short, test long: study report", ""] + (study_header(study) if study else [])
    out += _intro(results)
    nono = ratio_stats(rows, "nonoverlapping")
    if "nonoverlapping" in protocols:
        out += _headline(rows, nono, variants, longer)
        if longer:
            out += _paper_table(results, longer)
    if "fixed_target" in protocols and "nonoverlapping" in protocols and longer:
        out += _fixed_vs_nonoverlapping(rows, nono, variants, longer)
    out += ["## Plots", ""]
    for name in PLOTS if plots is None else [p for p in PLOTS if p in plots]:
        out += [f"![{PLOTS[name]}]({name})", ""]
    if plots is None or "ppl_ratio_vs_length.png" in plots:
        out += ["Every protocol: [ppl_ratio_vs_length.png](ppl_ratio_vs_length.png).", ""]
    return "\n".join(out)


def write_report(study_dir: Path) -> Path:
    """<study>/eval/report.md from <study>/eval/results.json and <study>/study.json (if there), and its plot:
    ppl_ratio.png (nonoverlapping ratios), or for an extension study (fine-tuned checkpoints) the extension
    report and extension_ppl.png, or for a task study (task checkpoints only) roformer/task_report.py's report."""
    study_dir = Path(study_dir)
    eval_dir = study_dir / "eval"
    results_path = eval_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found: run scripts/run_study.py --out {study_dir} first")
    results = json.loads(results_path.read_text())
    study_path = study_dir / "study.json"
    study = json.loads(study_path.read_text()) if study_path.is_file() else None
    header = study_header(study) if study else []
    if results.get("tasks") and not results["results"]:  # an algorithmic-task study
        return write_task_report(study_dir, header)
    if is_extension(results):
        plot_extension(results, eval_dir / EXTENSION_PLOT)
        text = extension_markdown(results, header)
    else:
        if has_ratios(results):  # the headline protocol, or every one if it was not scored
            nono = any(r["protocol"] == "nonoverlapping" for r in results["results"])
            plot_ppl_ratio(results, eval_dir / "ppl_ratio.png", ["nonoverlapping"] if nono else None)
        text = study_markdown(results, study, plots=[p.name for p in eval_dir.glob("*.png")])
    report = eval_dir / "report.md"
    atomic_write(report, text)
    return report
