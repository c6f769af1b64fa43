"""The retrieval probes' tables (rows of ``results["probes"]``, made by :mod:`roformer.probes`): a results.md section
with a table per probe and metric, and the lines evaluate.py prints. Variants are rows, lengths (passkey) or
distances (copy) columns; each number is a mean over trials, then over seeds. Result files written before the
probes existed have no ``probes`` key and get neither."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from roformer.data.tasks import TASKS, train_lengths
from roformer.result_rows import task_values

ABOUT = {
    "passkey": "Passkey retrieval (Mohtashami & Jaggi 2023): a random 5-digit key in filler text at a depth (the "
               "fraction of the filler before it); L: the most positions a trial reads (the prompt, then the answer).",
    "copy": "Copy: a span of random tokens, real text, then the span again starting d tokens after the first; the "
            "second copy's tokens but its first are scored.",
}
METRIC_ABOUT = {
    "exact_match": "Greedy decoding: how often the first integer in up to 10 new tokens is the key",
    "key_rank": "The rank of the key's log-likelihood among it and 9 other random keys (1 is the best)",
    "key_top1": "How often the key has the highest log-likelihood of the 10",
    "loss": "Mean loss (nats) on the repeated tokens",
    "top1": "Top-1 accuracy on the repeated tokens",
}


def probe_rows(results: dict) -> list[dict]:
    return results.get("probes") or []


def _where(r: dict) -> int:
    return r["length"] if r["probe"] == "passkey" else r["distance"]


def _column(probe: str, x: int) -> str:
    return f"L={x}" if probe == "passkey" else f"d={x}"


def aggregate(rows: list[dict]) -> dict:
    """(variant, probe, metric, length or distance, depth) -> {"mean", "std", "seeds", "status", "note"}: the
    cell's value over seeds; depth None is the mean over depths (passkey) or the cell itself (copy)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["variant"], r["probe"], r["metric"], _where(r), r.get("depth"))].append(r)
        if r.get("depth") is not None:
            groups[(r["variant"], r["probe"], r["metric"], _where(r), None)].append(r)
    out = {}
    for key, rs in groups.items():
        by_seed = defaultdict(list)
        for r in rs:
            if r["status"] == "ok":
                by_seed[r["seed"]].append(r["value"])
        means = np.array([np.mean(v) for v in by_seed.values()])
        out[key] = {"mean": float(means.mean()) if len(means) else None,
                    "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0, "seeds": len(means),
                    "status": "ok" if len(means) else rs[0]["status"], "note": "" if len(means) else rs[0]["note"]}
    return out


def _text(a: dict | None, spread: bool = False) -> str:
    if a is None:
        return ""
    if a["status"] != "ok":
        return a["status"]  # n/a | skipped
    return f"{a['mean']:.2f} ± {a['std']:.2f}" if spread and a["seeds"] > 1 else f"{a['mean']:.2f}"


def _chance(rows: list[dict], metric: str) -> float | None:
    """The metric's value for a model that cannot tell the answers apart, when its rows give one."""
    chance = {r["chance"] for r in rows if r["metric"] == metric and r.get("chance") is not None}
    return chance.pop() if len(chance) == 1 else None


def probe_markdown(results: dict) -> str:
    """results.md's probe section: a table per probe and metric (passkey: a row per depth and their mean)."""
    rows = probe_rows(results)
    agg = aggregate(rows)
    settings = results.get("settings", {})
    out = ["", "# Retrieval probes", "",
           f"Seed {settings.get('probe_seed')}, {settings.get('probe_trials')} trials per cell; mean over trials, then "
           "mean ± standard deviation over the checkpoints' seeds."]
    for probe in dict.fromkeys(r["probe"] for r in rows):
        pr = [r for r in rows if r["probe"] == probe]
        xs = sorted({_where(r) for r in pr})
        variants = list(dict.fromkeys(r["variant"] for r in pr))
        depths = sorted({r["depth"] for r in pr if r.get("depth") is not None})
        out += ["", f"## {probe}", "", ABOUT.get(probe, "")]
        for metric in dict.fromkeys(r["metric"] for r in pr):
            chance = _chance(pr, metric)
            about = METRIC_ABOUT.get(metric, metric) + ("" if chance is None else f"; chance {chance:.2g}")
            out += ["", f"### {probe}: {metric}", "", about + ".", ""]
            head = ["variant", *(["depth"] if depths else []), *(_column(probe, x) for x in xs)]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for v in variants:
                for depth in [*depths, None] if depths else [None]:
                    label = [] if not depths else ["mean" if depth is None else f"{depth:g}"]
                    cells = [_text(agg.get((v, probe, metric, x, depth)), spread=True) for x in xs]
                    out.append("| " + " | ".join([v, *label, *cells]) + " |")
    notes = sorted({(r["variant"], r["probe"], _column(r["probe"], _where(r)), r["note"]) for r in rows
                    if r["status"] == "skipped"})
    if notes:
        out += ["", "Skipped probe cells:", ""] + [f"- {v} {p} {x}: {note}" for v, p, x, note in notes]
    return "\n".join(out) + "\n"


def probe_terminal(results: dict) -> str:
    """What evaluate.py prints for the probes: a table per probe, every metric of it a row per variant, lengths or
    distances as columns; passkey averaged over depths (results.md has each depth)."""
    rows = probe_rows(results)
    agg = aggregate(rows)
    blocks = []
    for probe in dict.fromkeys(r["probe"] for r in rows):
        pr = [r for r in rows if r["probe"] == probe]
        xs = sorted({_where(r) for r in pr})
        metrics = list(dict.fromkeys(r["metric"] for r in pr))
        seeds = defaultdict(set)
        for r in pr:
            seeds[r["variant"]].add(r["seed"])
        table = [["variant", "seeds", "", *(_column(probe, x) for x in xs)]]
        for v in seeds:
            for i, m in enumerate(metrics):
                table.append([v if i == 0 else "", str(len(seeds[v])) if i == 0 else "", m,
                              *(_text(agg.get((v, probe, m, x, None))) for x in xs)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        depths = sorted({r["depth"] for r in pr if r.get("depth") is not None})
        head = (f"passkey retrieval, mean over depths {', '.join(f'{d:g}' for d in depths)}, keys and seeds"
                if probe == "passkey" else f"{probe}: loss and top-1 accuracy on the repeat at distance d, mean over "
                "spans and seeds")
        chance = [f"{m} {c:.2g}" for m in metrics if (c := _chance(pr, m)) is not None]
        lines = [head + (f"; chance: {', '.join(chance)}" if chance else "")]
        lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                  .rstrip() for r in table]
        notes = sorted({(r["status"], r["variant"], r["note"]) for r in pr if r["status"] != "ok" and r["note"]})
        lines += [f"{status}: {v} {note.removeprefix('n/a ')}" for status, v, note in notes]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def task_table(results: dict, markdown: bool) -> str:
    """Task checkpoints (rows of ``results["tasks"]``, roformer/tasks.py): exact match of greedy decoding per length
    bin, a table per task (each has its own L and unit, so its own bins) with a row per variant (mean over seeds)
    and the bins as columns; n/a past a learned position table."""
    rows = results.get("tasks") or []
    by = task_values(rows, lambda r: r["variant"])

    def cell(vals) -> str:
        if not vals or any(v is None for v in vals):
            return "n/a"
        return f"{np.mean(vals):.3f}" + (f" ± {np.std(vals):.3f}" if len(vals) > 1 else "")

    title = "exact match of greedy decoding per instance-length bin (the task's unit), mean over seeds"
    out = [f"## Tasks: {title}"] if markdown else [title]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        bins = sorted({(r["bin_lo"], r["bin_hi"]) for r in mine})
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        caption = task
        if task in TASKS:  # each L as its training lengths: 1-L, or L alone (recall)
            spans = (train_lengths(task, n) for n in sorted({r["train_len"] for r in mine}))
            trained = ", ".join(f"{lo}-{hi}" if lo == 1 else f"{hi}" for lo, hi in spans)
            caption = f"{task}: trained on {trained} {TASKS[task].unit}"
        head = ["variant", "seeds", *(f"{lo}-{hi}" for lo, hi in bins)]
        table = [head] + [[v, str(len({r["seed"] for r in mine if r["variant"] == v})),
                           *(cell(by.get((task, v, b))) for b in bins)] for v in variants]
        if markdown:
            out += ["", f"### {caption}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    *("| " + " | ".join(r) + " |" for r in table[1:])]
            continue
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        out += [caption, *("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                                            enumerate(zip(r, widths, strict=True))).rstrip() for r in table)]
    return "\n".join(out) + ("\n" if markdown else "")


def sections_markdown(results: dict) -> str:
    """results.md's sections after the perplexity tables: the probes', then the tasks'."""
    return (probe_markdown(results) if probe_rows(results) else "") + (
        "\n" + task_table(results, True) if results.get("tasks") else "")


def sections_terminal(results: dict) -> list[str]:
    """What evaluate.py prints after the perplexity tables: the probes' tables, then the tasks'."""
    return ([probe_terminal(results)] if probe_rows(results) else []) + (
        [task_table(results, False)] if results.get("tasks") else [])
