"""The report of an algorithmic-task study (``scripts/run_study.py --preset generalization``): exact match per
instance-length bin, per task and scheme, and the schemes' mean reciprocal rank beside Kazemnejad et al. (2023).

Input: the ``tasks`` rows of results.json (:mod:`roformer.result_rows` documents them). Seeds of one variant family
(``row_family``: ``learned-16L`` is shown as ``learned``) are averaged; a bin whose examples a model cannot read
(past a learned position table) counts as accuracy 0 in the ranking and shows as n/a in the tables.

Mean reciprocal rank, as the paper computes it following Liang et al. (2022): in every scenario (a task and one
test-length bin beyond the training lengths) the schemes are ranked by their mean accuracy over seeds, best first,
tied schemes sharing the better rank; a scheme's score in that scenario is 1 / its rank, and its MRR is the mean
over scenarios. The in-distribution bin is not a scenario: it measures learning, not generalization. The paper
tests lengths up to 2 L, so the MRR set beside its Fig. 1 ranks the bin L+1..2L of each task; the MRR over every
bin (to 4 L) follows. The paper's Fig. 1 ranks five schemes among themselves, so :data:`PAPER_MRR`'s are set beside
ours ranked among those five only, when the study has at least one of the paper's tasks (:data:`PAPER_TASKS`;
associative recall is ours); the ranking of every scheme follows.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from roformer.data.tasks import TASKS, train_lengths
from roformer.files import atomic_write
from roformer.reporting import new_figure, save_fig
from roformer.result_rows import row_family, task_values

# Kazemnejad et al. 2023 (NeurIPS, arXiv 2305.19466), Fig. 1: MRR over their 10 tasks, higher is better. Our
# scheme names; the paper's APE is the sinusoidal one (their §3).
PAPER_MRR = {"nope": 0.69, "t5": 0.55, "alibi": 0.50, "rope": 0.33, "sinusoidal": 0.22}
PAPER_NAME = {"nope": "NoPE", "t5": "T5's relative bias", "alibi": "ALiBi", "rope": "Rotary", "sinusoidal": "APE"}
PAPER_MULT = 2  # the paper tests lengths up to 2 L (its §3): the scenarios its MRR ranks
PAPER_TASKS = ("copy", "reverse", "addition", "sorting", "parity", "summation")  # ours among its 10 (App. D.1)
IN_DISTRIBUTION = 0.9  # the accuracy in distribution that counts as having learned the task
PLOT = "task_accuracy.png"
TASK_CSV = "task_accuracy.csv"

Bin = tuple[int, int]


def accuracy(rows: list[dict]) -> dict[tuple[str, str, Bin], list[float | None]]:
    """(task, family, bin) -> the accuracy of each seed (None: the model could not read the bin)."""
    return task_values(rows, row_family)


def _mean(values: list[float | None]) -> float:
    """The mean over seeds, a bin a seed cannot read counting as 0; rounded, so that equal accuracies summed in
    another order still tie."""
    return round(float(np.mean([0.0 if v is None else v for v in values])), 9)


def tasks_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in rows))


def families_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row_family(r) for r in rows))


def bins_of(rows: list[dict], task: str) -> list[Bin]:
    return sorted({(r["bin_lo"], r["bin_hi"]) for r in rows if r["task"] == task})


def scenarios(rows: list[dict], up_to: int | None = None) -> list[tuple[str, Bin]]:
    """(task, bin) of every test bin beyond the training lengths (each task's bins but its first), up to ``up_to``
    x L (None: all of them)."""
    return [(t, b) for t in tasks_of(rows) for i, b in enumerate(bins_of(rows, t))
            if i > 0 and (up_to is None or i < up_to)]


def mean_reciprocal_rank(rows: list[dict], families: list[str], up_to: int | None = None) -> dict[str, float]:
    """Each family's MRR among ``families`` over :func:`scenarios` up to ``up_to`` x L (ties share the better
    rank). A family without rows in a scenario is left out of that scenario's ranking."""
    acc = accuracy(rows)
    rr: dict[str, list[float]] = {f: [] for f in families}
    for task, b in scenarios(rows, up_to):
        means = {f: _mean(acc[(task, f, b)]) for f in families if (task, f, b) in acc}
        for f, m in means.items():
            rank = 1 + sum(other > m for other in means.values())
            rr[f].append(1.0 / rank)
    return {f: float(np.mean(v)) for f, v in rr.items() if v}


def _cell(values: list[float | None] | None) -> str:
    if not values:
        return ""
    if any(v is None for v in values):
        return "n/a"
    mean = 100 * np.mean(values)
    return f"{mean:.0f}" + (f" ± {100 * np.std(values):.0f}" if len(values) > 1 else "")


def learned_count(rows: list[dict], task: str) -> tuple[int, int]:
    """(families whose mean accuracy in distribution is at least IN_DISTRIBUTION, families) for ``task``."""
    acc, b = accuracy(rows), bins_of(rows, task)[0]
    fams = [f for f in families_of(rows) if (task, f, b) in acc]
    return sum(_mean(acc[(task, f, b)]) >= IN_DISTRIBUTION for f in fams), len(fams)


def accuracy_tables(rows: list[dict]) -> list[str]:
    """A markdown table per task: a row per family, the bins as columns (% exact match, mean ± std over seeds)."""
    acc, out = accuracy(rows), []
    for task in tasks_of(rows):
        bins = bins_of(rows, task)
        fams = [f for f in families_of(rows) if any((task, f, b) in acc for b in bins)]
        fams.sort(key=lambda f: -np.mean([_mean(acc.get((task, f, b), [0.0])) for b in bins[1:]] or [0.0]))
        seeds = {f: len(acc.get((task, f, bins[0]), [])) for f in fams}
        learned, n = learned_count(rows, task)
        at = _trained_at(task, bins[0])
        head = ["scheme", "seeds", *(f"{lo}–{hi}" + (f" ({at})" if i == 0 else "") for i, (lo, hi) in
                                      enumerate(bins))]
        out += [f"### {task}", "",
                f"{learned} of {n} schemes reach {IN_DISTRIBUTION:.0%} in distribution (the first bin).", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join([f, str(seeds[f]), *(_cell(acc.get((task, f, b))) for b in bins)]) + " |"
                for f in fams]
        out.append("")
    return out


def _trained_at(task: str, first: Bin) -> str:
    """How the first bin was trained: ``train`` (lengths 1..L), or ``trained at L`` for a task whose training
    instances all have length L (associative recall)."""
    lo, hi = train_lengths(task, first[1]) if task in TASKS else first
    return "train" if lo == 1 else f"trained at {hi}"


def _order(score: dict[str, float], families: list[str]) -> str:
    """``NoPE > T5's relative bias = ALiBi > ...``: best first, ``=`` between scores equal to 2 decimals."""
    ranked = sorted(families, key=lambda f: -score[f])
    out = PAPER_NAME[ranked[0]]
    for a, b in zip(ranked, ranked[1:], strict=False):
        out += (" = " if round(score[a], 2) == round(score[b], 2) else " > ") + PAPER_NAME[b]
    return out


def mrr_tables(rows: list[dict]) -> list[str]:
    """Ours beside the paper's Fig. 1 (the five schemes ranked among themselves), then every scheme's MRR: over the
    bins up to PAPER_MULT x L (the paper's test lengths) and over every bin."""
    fams = families_of(rows)
    five = [f for f in PAPER_MRR if f in fams]
    n_near, n_all = len(scenarios(rows, PAPER_MULT)), len(scenarios(rows))
    out = [f"Scenarios: each task's test bins beyond L. Up to {PAPER_MULT} L, as far as the paper tests: {n_near} "
           f"({len(tasks_of(rows))} tasks); up to the last bin: {n_all}. Far beyond L most scenarios are at zero or "
           "at chance for every scheme, so their ranks are mostly noise.", ""]
    if five and not set(tasks_of(rows)) & set(PAPER_TASKS):
        out += ["Kazemnejad et al.'s Fig. 1 is not set beside: none of this study's tasks is one of theirs.", ""]
    elif five:
        near, far = mean_reciprocal_rank(rows, five, PAPER_MULT), mean_reciprocal_rank(rows, five)
        out += [f"| scheme | paper (Fig. 1, 10 tasks, up to 2 L) | ours, up to {PAPER_MULT} L | ours, every bin |",
                "|---|---|---|---|"]
        out += [f"| {PAPER_NAME[f]} ({f}) | {PAPER_MRR[f]:.2f} | {near[f]:.2f} | {far[f]:.2f} |" for f in five]
        out += ["", f"Paper's order: {_order(PAPER_MRR, five)}. Ours up to {PAPER_MULT} L: {_order(near, five)}.", ""]
    near, far = mean_reciprocal_rank(rows, fams, PAPER_MULT), mean_reciprocal_rank(rows, fams)
    out += ["Every scheme ranked among all of them:", "", f"| scheme | up to {PAPER_MULT} L | every bin |",
            "|---|---|---|"]
    out += [f"| {f} | {near[f]:.2f} | {far[f]:.2f} |" for f in sorted(near, key=lambda f: (-near[f], -far[f]))]
    return out + [""]


def task_figure(results: dict):
    """A panel per task: mean exact match (± std over seeds) against the bin's upper length, a line per scheme; the
    training lengths shaded."""
    rows = results.get("tasks") or []
    tasks, fams = tasks_of(rows), families_of(rows)
    cols = min(3, len(tasks))
    n_rows = -(-len(tasks) // cols)
    fig, axes = new_figure(n_rows, cols, "exact match of greedy decoding by instance length (mean ± std over seeds)")
    from matplotlib import colormaps  # with the figure: only when plots are drawn

    colors = colormaps["tab20"].colors  # 20 colours: a scheme each, as many as a registry holds
    acc = accuracy(rows)
    for ax, task in zip(axes.flat, tasks, strict=False):
        bins = bins_of(rows, task)
        for i, f in enumerate(fams):
            pts = [(hi, [0.0 if v is None else v for v in acc[(task, f, (lo, hi))]]) for lo, hi in bins
                   if (task, f, (lo, hi)) in acc]
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            mean, std = (np.array([fn(p[1]) for p in pts]) for fn in (np.mean, np.std))
            color = colors[(2 * i) % 20 + (2 * i) // 20 % 2]  # the dark shades first, then the light ones
            ax.plot(x, mean, marker="o", ms=3, color=color, label=f, ls="-" if i < 10 else "--")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        ax.axvspan(0, bins[0][1], color="0.9", zorder=0)
        ax.set_title(task)
        ax.set_xlabel("instance length (bin's upper end)")
        ax.set_xticks([hi for _, hi in bins])
        ax.set_ylim(-0.03, 1.03)
    for ax in axes.flat[len(tasks):]:
        ax.set_axis_off()
    for row in axes:
        row[0].set_ylabel("exact match")
    axes.flat[0].legend(fontsize=7, loc="upper right", ncols=2)
    return fig


def task_markdown(results: dict, header: list[str], plot: str | None = PLOT) -> str:
    rows = results.get("tasks") or []
    ck = results["checkpoints"][0]
    model, data = ck["config"]["model"], ck["data"]
    steps = sorted({c.get("step") for c in results["checkpoints"] if c.get("step")})
    at_l = [t for t in tasks_of(rows) if t in TASKS and TASKS[t].train_at_max]
    lengths = "1..L" + (f" ({', '.join(at_l)}: exactly L)" if at_l else "")
    out = ["# Length generalization on algorithmic tasks", "", *header,
           f"Every cell: [{TASK_CSV}]({TASK_CSV}).", "",
           f"Each scheme is trained on every task with instance lengths {lengths} and scored by exact match of greedy "
           f"decoding on {results['settings'].get('task_examples')} examples per bin of lengths up to "
           f"{data.get('task_test_max_mult')} L (the task's own unit); model {model.get('n_layer')} layers, d_model "
           f"{model.get('d_model')}, {model.get('n_head')} heads; {', '.join(map(str, steps))} steps. Accuracy in %, "
           "mean ± std over seeds.", "",
           "## Mean reciprocal rank beyond the training lengths", "", *mrr_tables(rows),
           "## Exact match per length bin", ""]
    if plot:
        out += [f"![exact match by length]({plot})", ""]
    return "\n".join(out + accuracy_tables(rows))


def accuracy_csv(rows: list[dict]) -> str:
    """A line per task, scheme and bin: the mean and std over seeds and each seed's accuracy (empty: not readable)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "scheme", "bin_lo", "bin_hi", "seeds", "mean", "std", "per_seed"])
    for (task, fam, (lo, hi)), values in accuracy(rows).items():
        ok = None not in values
        w.writerow([task, fam, lo, hi, len(values), f"{np.mean(values):.4f}" if ok else "",
                    f"{np.std(values):.4f}" if ok else "", " ".join("" if v is None else f"{v:.4f}" for v in values)])
    return buf.getvalue()


def write_task_report(study_dir: Path, header: list[str]) -> Path:
    """<study>/eval/report.md, task_accuracy.png and task_accuracy.csv from <study>/eval/results.json's task rows."""
    eval_dir = Path(study_dir) / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    save_fig(task_figure(results), eval_dir / PLOT)
    atomic_write(eval_dir / TASK_CSV, accuracy_csv(results.get("tasks") or []))
    path = eval_dir / "report.md"
    atomic_write(path, task_markdown(results, header))
    return path


__all__ = ["PAPER_MRR", "accuracy", "mean_reciprocal_rank", "scenarios", "task_markdown", "write_task_report"]
