"""Scoring a model trained on an algorithmic task (``data=task``): exact-match accuracy per instance-length bin.

The tasks, their formats and generators are :mod:`roformer.data.tasks`'s. A task checkpoint is one whose saved data
config has ``name == "task"``; its ``data.task``, ``data.task_seed``, ``data.task_max_len`` and
``data.task_test_max_mult`` regenerate the test bins (:func:`checkpoint_bins`), so evaluation needs nothing else::

    data_cfg = DataConfig(**ckpt["data_cfg"])
    if is_task(data_cfg):
        rows = score_task(model, tokenizer, data_cfg.task, checkpoint_bins(data_cfg), n_per_bin=200,
                          seed=data_cfg.task_seed, device=device)

An answer is right when greedy decoding after the prompt produces exactly its tokens and then the end-of-example
token; for associative recall, whose asker supplies the keys (``Task.given``), when greedy decoding after each key
asked gives its value. That is computed in one teacher-forced forward per batch: greedy decoding reproduces the
answer exactly when, at every scored position (``TokenSplit.scored``), the argmax of the logits after the true
prefix is the true next token (by induction over the positions: while the output so far is right, the next greedy
token is the argmax after the true prefix). So the score is greedy decoding's, with no decoding loop, every example
starting at position 0 as in :func:`roformer.generation.generate` (tests/test_tasks.py checks the two agree).
Examples are right-padded in a batch; the model is causal, so padding after an example changes nothing before it.
(Randomized positions, ``pos.randomized_max``, are drawn per padded width, as training draws them.)
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from roformer.data.cache import TokenSplit
from roformer.data.config import TASK, DataConfig
from roformer.data.sampler import IGNORE_INDEX, example_batch
from roformer.data.tasks import EOD_ID, PAD_ID, STREAMS, TASKS, generate, length_bins, vocabulary


def is_task(data_cfg: DataConfig) -> bool:
    """Whether a (checkpoint's) data config is an algorithmic task's rather than a corpus's."""
    return data_cfg.name == TASK


def checkpoint_bins(data_cfg: DataConfig) -> list[tuple[int, int]]:
    """The test bins a task run was made for: 1..L, L+1..2L, ... up to task_test_max_mult x L."""
    return length_bins(data_cfg.task_max_len, data_cfg.task_test_max_mult)


def bin_examples(task: str, lo: int, hi: int, n: int, seed: int) -> TokenSplit:
    """The ``n`` scored examples of bin lo..hi, as a split of task examples: the same for the same (task, bin, n,
    seed) on every machine."""
    ex = generate(task, n, lo, hi, seed, (*STREAMS["bins"], lo, hi))
    return TokenSplit(f"{task} {lo}-{hi}", ex.tokens, ex.offsets, EOD_ID, {"lengths": ex.lengths},
                      prompt_lens=ex.prompt_lens, pad_id=PAD_ID, scored=ex.scored)


def _check_tokenizer(tokenizer: Tokenizer, task: str) -> None:
    """Refuse a tokenizer that is not the task's vocabulary (ids must mean the same words)."""
    want = vocabulary(task, tokenizer.id_to_token(EOD_ID) or "")
    got = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    if got != want:
        raise ValueError(f"the tokenizer is not task {task}'s vocabulary ({len(got)} ids, {len(want)} expected); "
                         "score a checkpoint with the task it was trained on (its data.task)")


@torch.no_grad()
def correct(model, examples: TokenSplit, idx: np.ndarray, device) -> np.ndarray:
    """(len(idx),) bool: whether greedy decoding after each example's prompt gives exactly its answer and EOD (recall:
    each value after its key)."""
    x, y = (t.to(device) for t in example_batch(examples, idx))  # (B, T): y is IGNORE_INDEX off the scored tokens
    logits, _ = model(x)  # (B, T, V)
    right = (logits.argmax(dim=-1) == y) | (y == IGNORE_INDEX)
    return right.all(dim=1).cpu().numpy()


def score_task(model, tokenizer: Tokenizer, task: str, bins: list[tuple[int, int]], n_per_bin: int, seed: int,
               device, batch_size: int = 64) -> list[dict]:
    """Exact-match accuracy of greedy decoding per bin of instance lengths (in the task's unit).

    One row per bin: ``{"task", "bin": (lo, hi), "accuracy", "n", "n_correct", "max_tokens"}``, where ``n`` examples
    with lengths uniform in lo..hi come from :func:`bin_examples` (``seed``: the run's data.task_seed) and
    ``max_tokens`` is the longest example's length. A bin whose examples pass the model's position table (learned
    positions) gets accuracy and n_correct None: the model cannot read them. ``model`` is put in eval mode; wrap the
    call in autocast or ``model.scaled_positions(...)`` as wanted.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of: {', '.join(TASKS)}")
    if n_per_bin < 1:
        raise ValueError(f"n_per_bin={n_per_bin} must be >= 1")
    _check_tokenizer(tokenizer, task)
    model.eval()
    limit = model.pos.max_positions(model.pos.cfg)
    rows = []
    for lo, hi in bins:
        ex = bin_examples(task, lo, hi, n_per_bin, seed)
        max_tokens = int(np.diff(ex.doc_offsets).max())
        row = {"task": task, "bin": (lo, hi), "accuracy": None, "n": n_per_bin, "n_correct": None,
               "max_tokens": max_tokens}
        if limit is None or max_tokens - 1 <= limit:
            # longest first, so that each batch pads little
            order = np.argsort(-np.diff(ex.doc_offsets), kind="stable")
            hits = sum(int(correct(model, ex, order[i : i + batch_size], device).sum())
                       for i in range(0, n_per_bin, batch_size))
            row.update(accuracy=hits / n_per_bin, n_correct=hits)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A small table of score_task's rows."""
    lines = [f"{'task':<20} {'bin':>9} {'accuracy':>8} {'n':>6}"]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"{r['task']:<20} {r['bin'][0]:>4}-{r['bin'][1]:<4} {acc:>8} {r['n']:>6}")
    return "\n".join(lines)


__all__ = ["bin_examples", "checkpoint_bins", "correct", "format_rows", "is_task", "score_task"]
