"""Result rows: the format of ``results.json``, and reading a row's identity from its fields.

``results.json`` (format ``roformer-eval`` version 1)::

    {"format": {"name": "roformer-eval", "version": 1},
     "settings": {...eval settings...},
     "checkpoints": [{"label", "path", IDENTITY, "train_len", "step", "tokens_seen", "group",
                      "config": {"model", "pos", "train"}, "data": {...}, "split_tokens", "split_docs"}],
                      # a task checkpoint: "task" instead of "split_tokens" and "split_docs"
     "results": [{"label", ROW, "train_len", "kind": "perplexity", "protocol", "length",
                  "status": "ok" | "n/a" | "skipped", "note", "ppl", "nll_sum", "tokens", "bytes", "words",
                  "bits_per_byte", "word_ppl", "ratio",            # ratio: ppl / ppl at the training length
                  "target_tokens"}],                               # fixed_target rows: K, last tokens per doc
     "per_position": [{"label", "variant", "rope_scaling", "length", "mean_loss": [...]}],
     "probes": [{"label", ROW, "train_len", "kind": "probe", "probe", "metric", "value", "n", "length",
                 "distance", "depth", "status", "note", "prompt_tokens", "chance"}],
     "tasks": [{"label", ROW, "train_len", "kind": "task", "task", "metric": "exact_match", "bin_lo", "bin_hi",
                "length", "value", "n", "n_correct", "max_tokens"}]}  # length: the bin's upper bound (the task's unit)

IDENTITY, what the checkpoint's model is (eval_run.Identity): "variant" (the display name, made from the rest),
"family" (the variant it is shown beside: learned-32L's is learned), "scheme" (pos.name), "attention",
"table_multiple" (a learned table's size / train_len, else null), "scale_embeddings", "randomized", "rope_base"
(null: the default), "train_scaling" (pos.scaling as trained), "init_from" (the checkpoint it was fine-tuned
from, else null), "fine_tuned", "ft_method" (how a fine-tuned one was extended: a RoPE scaling, abf or none; null
when not fine-tuned), "seed". ROW: IDENTITY with what evaluation adds to the variant and family (a zero-shot
scaling, "+bca"), and "base_variant" (the variant without the zero-shot scaling), "rope_scaling" (the zero-shot
scaling), "bca".

Reports group by those fields and never parse the display name, except in files written before the fields were
(no "family", "fine_tuned" or "base_variant" keys): :func:`row_family` and the other ``row_*`` helpers fall back to
parsing the variant there. ``probes`` and ``tasks`` are absent from files written before them; readers take them
as empty.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


def variant_family(variant: str) -> str:
    """The family a variant's *name* says it belongs to, for result files written before rows had a ``family``:
    its name without the ``-<tag>`` of its first part, so ``learned-32L`` goes with ``learned`` and
    ``sinusoidal-fairseq`` with ``sinusoidal`` (``rope+pi`` is its own). Reports call :func:`row_family`."""
    head, *rest = variant.split("+")
    return "+".join([head.split("-")[0], *rest])


# A row's identity fields (eval_run.Identity); result files written before them have only the display name, which
# these fall back to parsing.


def row_family(row: dict) -> str:
    """The variant a row's curve is shown beside (``learned-32L`` and ``learned``: ``learned``)."""
    return row["family"] if "family" in row else variant_family(row["variant"])


def row_fine_tuned(row: dict) -> bool:
    """Whether the row's checkpoint was fine-tuned from another (trainer.init_from)."""
    return row["fine_tuned"] if "fine_tuned" in row else "-ft" in row["variant"]


def row_base_variant(row: dict) -> str:
    """The variant the row's is without its zero-shot RoPE scaling (``rope+yarn``: ``rope``)."""
    if "base_variant" in row:
        return row["base_variant"]
    v, m = row["variant"], row["rope_scaling"]
    return v[: -len(m) - 1] if m != "none" and v.endswith("+" + m) else v


def task_values(rows: list[dict], name: Callable[[dict], str]) -> dict[tuple[str, str, tuple[int, int]], list]:
    """Task rows -> (task, ``name(row)``, (bin_lo, bin_hi)) -> each seed's value (None: the bin was not readable),
    e.g. ``name=row_family`` to put a study's seeds and siblings together."""
    out: dict = defaultdict(list)
    for r in rows:
        out[(r["task"], name(r), (r["bin_lo"], r["bin_hi"]))].append(r["value"])
    return dict(out)


__all__ = ["row_base_variant", "row_family", "row_fine_tuned", "task_values", "variant_family"]
