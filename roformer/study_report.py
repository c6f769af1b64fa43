"""The study's comparison report: ratio tables with mean ± std over seeds, beside the ALiBi paper's ratios.

Built from an evaluation's ``results.json`` and the study's ``study.json`` (command, commit, machine, wall
times; see ``scripts/run_study.py``). Everything in it is computed from those two files, so the report can be
rebuilt at any time with ``python scripts/study_report.py <study folder>``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from roformer.files import atomic_write
from roformer.reporting import aggregate

# Press, Smith & Lewis (2022), "Train Short, Test Long" (ALiBi): WikiText-103, trained at L = 512,
# nonoverlapping evaluation; perplexity at about 2 L, 5 L and 24 L divided by perplexity at L.
PAPER = "Press et al. (2022), WikiText-103, L = 512, nonoverlapping"
PAPER_RATIOS = {
    "sinusoidal": {2: 2.2, 5: 6.6, 24: 18.6},
    "rope": {2: 1.07, 5: 1.57, 24: 3.5},
    "alibi": {2: 0.95, 5: 0.93, 24: 0.93},
}
SCALINGS = ("pi", "ntk", "dynamic_ntk", "yarn")


def ratio_stats(rows: list[dict], protocol: str) -> dict[tuple[str, float], dict]:
    """(variant, multiplier) -> {"mean", "std", "n", "ratios"} of ppl / ppl at L over seeds, or a status note.

    The multiplier is length / train_len. Cells where a checkpoint could not be scored (learned beyond its
    table) carry ``status`` "n/a" and their note.
    """
    groups = defaultdict(list)
    for r in rows:
        if r["protocol"] == protocol:
            groups[(r["variant"], r["length"] / r["train_len"])].append(r)
    out = {}
    for key, rs in groups.items():
        ratios = [r["ratio"] for r in rs if r["status"] == "ok" and r.get("ratio") is not None]
        if ratios:
            a = np.array(ratios)
            out[key] = {
                "status": "ok",
                "mean": float(a.mean()),
                "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "n": len(a),
                "ratios": ratios,
            }
        else:  # n/a (learned beyond its table), skipped (text too short), or no score at L to divide by
            bad = next((r for r in rs if r["status"] != "ok"), None)
            out[key] = {"status": bad["status"], "note": bad["note"]} if bad else {"status": "no ratio", "note": ""}
            out[key]["n"] = 0
    return out


def _mult(m: float) -> str:
    return f"{m:g} L"


def _ratio(a: dict | None, std: bool = True) -> str:
    if a is None:
        return ""
    if a["status"] != "ok":
        return "n/a" if a["status"] == "n/a" else "–"
    if std and a["n"] > 1:
        return f"{a['mean']:.2f} ± {a['std']:.2f}"
    return f"{a['mean']:.2f}×"


def nearest(available: list[float], target: float) -> float:
    """The available multiplier closest to target on a log scale."""
    return min(available, key=lambda m: abs(math.log(m / target)))


def _order(variants: list[str], stats: dict, last: float) -> list[str]:
    """Variants sorted by their mean ratio at the longest length, those without one (n/a) last."""

    def key(v):
        a = stats.get((v, last))
        return (0, a["mean"]) if a and a["status"] == "ok" else (1, 0.0)

    return sorted(variants, key=key)


def _study_header(study: dict) -> list[str]:
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


def study_markdown(results: dict, study: dict | None = None) -> str:
    """The comparison report (markdown). ``study`` is run_study.py's record; without it the header is skipped."""
    rows = results["results"]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    base_variants = [v for v in variants if v.rsplit("+", 1)[-1] not in SCALINGS]
    mults = sorted({r["length"] / r["train_len"] for r in rows})
    longer = [m for m in mults if m > 1]
    train_lens = sorted({c["train_len"] for c in results["checkpoints"]})
    seeds = sorted({c["seed"] for c in results["checkpoints"]})
    out = ["# Train short, test long: study report", ""] + (_study_header(study) if study else [])
    ck = results["checkpoints"][0]
    tokens = sorted({c["tokens_seen"] for c in results["checkpoints"]})
    out += [
        f"Training length L = {', '.join(map(str, train_lens))}; seeds {', '.join(map(str, seeds))}; "
        f"{', '.join(f'{t:,}' for t in tokens)} training tokens per run; model "
        f"{ck['config']['model'].get('n_layer')} layers, d_model {ck['config']['model'].get('d_model')}, "
        f"{ck['config']['model'].get('n_head')} heads; evaluated on the {results['settings']['split']} split.",
        "Ratios are perplexity at each length divided by perplexity at L, per seed, then mean ± standard "
        "deviation over seeds.",
        "",
    ]
    nono = ratio_stats(rows, "nonoverlapping")
    if "nonoverlapping" in protocols:
        agg = aggregate(rows)  # ppl mean and std over seeds per (variant, protocol, length)
        train_len = {r["variant"]: r["train_len"] for r in rows}
        order = _order(variants, nono, longer[-1]) if longer else variants
        out += ["## Perplexity ratio to L, nonoverlapping", ""]
        out.append("| variant | ppl at L | " + " | ".join(_mult(m) for m in longer) + " |")
        out.append("|---|---|" + "---|" * len(longer))
        for v in order:
            a = agg.get((v, "nonoverlapping", train_len[v]))
            ppl = ""
            if a and a["status"] == "ok":
                ppl = f"{a['mean']:.1f}" + (f" ± {a['std']:.1f}" if a["n"] > 1 else "")
            out.append(f"| {v} | {ppl} | " + " | ".join(_ratio(nono.get((v, m))) for m in longer) + " |")
        out.append("")
        if longer:
            out += _paper_table(nono, longer)
    if "fixed_target" in protocols and "nonoverlapping" in protocols and longer:
        fixed = ratio_stats(rows, "fixed_target")
        tt = sorted({r["tokens"] for r in rows if r["protocol"] == "fixed_target" and r["status"] == "ok"})
        out += [
            "## Fixed-target against nonoverlapping",
            "",
            f"Fixed-target scores the same {', '.join(f'{t:,}' for t in tt)} target tokens at every length, "
            "with more context before them; the cell is its ratio to L beside the nonoverlapping one "
            "(fixed-target / nonoverlapping, means over seeds).",
            "",
            "| variant | " + " | ".join(_mult(m) for m in longer) + " |",
            "|---|" + "---|" * len(longer),
        ]
        for v in _order(base_variants, fixed, longer[-1]):
            cells = []
            for m in longer:
                f, n = fixed.get((v, m)), nono.get((v, m))
                cells.append(
                    f"{_ratio(f, std=False)} / {_ratio(n, std=False)}"
                    if f and n and f["status"] == n["status"] == "ok"
                    else ("n/a" if (f or n) else "")
                )
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## Plots",
        "",
        "![perplexity against evaluation length](ppl_vs_length.png)",
        "",
        "![perplexity ratio to L against evaluation length](ppl_ratio_vs_length.png)",
        "",
        "![per-position loss](per_position.png)",
        "",
    ]
    return "\n".join(out)


def _paper_table(stats: dict, longer: list[float]) -> list[str]:
    """Our ratios at the lengths nearest the paper's ~2 L, ~5 L, ~24 L, beside the paper's."""
    targets = sorted({m for ratios in PAPER_RATIOS.values() for m in ratios})
    ours = [nearest(longer, t) for t in targets]
    out = [
        f"## Beside the ALiBi paper ({PAPER})",
        "",
        "Each cell: ours (mean ± std over seeds) / the paper's.",
        "",
        "| scheme | " + " | ".join(f"{_mult(o)} / ~{t} L" for o, t in zip(ours, targets, strict=True)) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for scheme, paper in PAPER_RATIOS.items():
        cells = []
        for o, t in zip(ours, targets, strict=True):
            a = stats.get((scheme, o))
            cells.append(f"{_ratio(a)} / {paper[t]:.2f}" if a else f"(not run) / {paper[t]:.2f}")
        out.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return out + [""]


def write_report(study_dir: Path) -> Path:
    """<study>/eval/report.md from <study>/eval/results.json and <study>/study.json (if there)."""
    study_dir = Path(study_dir)
    results_path = study_dir / "eval" / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found: run scripts/run_study.py --out {study_dir} first")
    results = json.loads(results_path.read_text())
    study_path = study_dir / "study.json"
    study = json.loads(study_path.read_text()) if study_path.is_file() else None
    report = study_dir / "eval" / "report.md"
    atomic_write(report, study_markdown(results, study))
    return report
