"""Can a model learn in-context associative recall within a budget? A check of the induction circuit (a
previous-token head feeding a matching head) that the associative_recall task and the copy probe need.

    python scripts/induction_check.py                         # data=task's tiny model (RoPE), 3000 steps
    python scripts/induction_check.py --bos                   # the same with one constant token at the start
    python scripts/induction_check.py --queries 1 -- pos=alibi model.n_layer=3   # train.py overrides after --

Each sequence is n key-value pairs, then queries: ``[BOS] k1 v1 k2 v2 ... kn vn [SEP] q1 a1 q2 a2 ...``. Keys are
n distinct ids of 100, values one of 10 ids (repeats allowed), each query one of the sequence's keys (distinct, in
random order) and its answer that key's value: the loss and the accuracy are on the answers only, which need the
lookup (a model that picks any of the n values of the sequence gets 1/n + (1 - 1/n)/10: values repeat). Fresh
sequences every step; a fixed set of 1000 held-out sequences is scored every --every steps. The model and
positional scheme are train.py's, composed from configs/ with data=task (configs/data_preset/task.yaml) and the
overrides after ``--``; the optimiser is AdamW at the composed lr, betas and weight decay, constant (no warmup or
decay), in fp32 on one thread unless --threads.

The last line gives the held-out accuracy by query (first asked, second, ...): a model that answers with a value
not yet asked for, rather than the queried key's, is right on the last query only.

What it showed (docs/generalization/README.md, "Associative recall"): RoPE's tiny model passes 90% with 4 pairs and
4 queries within 750-1,250 steps (3 seeds), but not with one query per sequence, nor with a --bos or --sep token,
within 3,000 steps (nor in 6,000 for --sep, and for --bos with seed 1): one token that is the same in every
sequence is enough to stall it, at the answer "a value not asked for yet" (by query: 36, 43, 52, 100%). So the
associative_recall task (roformer/data/tasks.py) has no constant token.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from roformer.config import to_config  # noqa: E402
from roformer.data.sampler import IGNORE_INDEX  # noqa: E402
from roformer.files import one_line  # noqa: E402
from roformer.model import TransformerLM  # noqa: E402

N_KEYS, N_VALUES = 100, 10
VALUE0 = 1 + N_KEYS  # ids: 0 unused, keys 1..100, values 101..110, then BOS and SEP
BOS_ID, SEP_ID = VALUE0 + N_VALUES, VALUE0 + N_VALUES + 1
VOCAB = SEP_ID + 1


def chance(pairs: int) -> float:
    """The accuracy of answering with the value of a random pair of the sequence (right when that pair is the
    queried one, or when its value happens to be the same)."""
    return 1 / pairs + (1 - 1 / pairs) / N_VALUES


def recall_batch(rng: np.random.Generator, batch: int, pairs: int, queries: int, bos: bool = False,
                 sep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), both (batch, bos + 2 pairs + sep + 2 queries) int64: x the sequences, y each answer's value at its
    query's position and IGNORE_INDEX elsewhere."""
    keys = np.argsort(rng.random((batch, N_KEYS)), axis=1)[:, :pairs] + 1  # distinct keys per row
    values = rng.integers(0, N_VALUES, size=(batch, pairs)) + VALUE0
    asked = np.argsort(rng.random((batch, pairs)), axis=1)[:, :queries]
    q, a = np.take_along_axis(keys, asked, 1), np.take_along_axis(values, asked, 1)
    cols = [np.full((batch, 1), BOS_ID)] if bos else []
    cols.append(np.stack([keys, values], 2).reshape(batch, -1))
    cols += [np.full((batch, 1), SEP_ID)] if sep else []
    start = sum(c.shape[1] for c in cols)
    cols.append(np.stack([q, a], 2).reshape(batch, -1))
    x = np.concatenate(cols, 1)
    y = np.full_like(x, IGNORE_INDEX)
    y[:, start::2] = a  # the query's position predicts its answer
    return torch.from_numpy(x), torch.from_numpy(y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="key-value pairs per sequence (at most 100)")
    ap.add_argument("--queries", type=int, default=4, help="queries per sequence (at most --pairs)")
    ap.add_argument("--bos", action="store_true", help="a constant token before the pairs")
    ap.add_argument("--sep", action="store_true", help="a constant token between the pairs and the queries")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=250, help="score the held-out sequences every this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="train.py overrides for the model and scheme, after --")
    args = ap.parse_args(argv)
    for key, lo, hi in (("pairs", 1, N_KEYS), ("queries", 1, args.pairs), ("steps", 1, None), ("batch", 1, None),
                        ("every", 1, None), ("threads", 1, None)):
        v = getattr(args, key)
        if v < lo or (hi is not None and v > hi):
            ap.error(f"--{key}={v} must be in {lo}..{hi if hi is not None else 'any'}")
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs"), job_name="induction"):
            cfg = to_config(compose("train", overrides=["data=task", "logger=none", *args.overrides]))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        ap.error(f"the overrides {args.overrides} do not make a train.py config: {one_line(e)}")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = TransformerLM(replace(cfg.model, vocab_size=VOCAB), cfg.pos)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    rng, held_out_rng = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    shape = dict(pairs=args.pairs, queries=args.queries, bos=args.bos, sep=args.sep)
    x_val, y_val = recall_batch(held_out_rng, 1000, **shape)
    print(f"pos={cfg.pos.name}, {cfg.model.n_layer} layers, d_model {cfg.model.d_model}, {cfg.model.n_head} heads; "
          f"{args.pairs} pairs, {args.queries} queries, bos={args.bos}, sep={args.sep}; lr {cfg.optim.lr}, "
          f"batch {args.batch}; picking any value of the sequence scores {chance(args.pairs):.3f}", flush=True)
    print("step   loss  held-out accuracy  seconds", flush=True)
    t0, reached = time.time(), None
    for step in range(1, args.steps + 1):
        model.train()
        _, loss = model(*recall_batch(rng, args.batch, **shape))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                logits, _ = model(x_val)
            hits = (logits.argmax(-1) == y_val)[y_val != IGNORE_INDEX].view(len(y_val), args.queries)
            acc = float(hits.float().mean())
            if reached is None and acc >= 0.9:
                reached = step
            print(f"{step:>5} {loss.item():6.3f} {acc:18.3f} {time.time() - t0:8.0f}", flush=True)
    print(f"90% held-out accuracy: {'first at step ' + str(reached) if reached else 'not reached'}"
          f" in {args.steps} steps", flush=True)
    print("held-out accuracy by query (first asked first): "
          + " ".join(f"{a:.3f}" for a in hits.float().mean(0).tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
