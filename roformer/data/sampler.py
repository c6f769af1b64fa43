"""Training batches, deterministic, resumable and split across DDP ranks: random windows of a token stream
(`WindowSampler`), or padded task examples with the loss on their answers (`ExampleSampler`, data=task)."""

from __future__ import annotations

import numpy as np
import torch


class _SeededSampler:
    """What both samplers share: a seeded global draw per step, and its state for exact resume.

    `state_dict()` holds the generator state as plain Python ints; after `load_state_dict` the sampler draws
    exactly the batches the saved one would have drawn next (also with another world_size, as long as
    batch_size * world_size is unchanged)."""

    seed: int
    step: int
    seq_len: int
    global_batch: int
    n_starts: int
    _rng: np.random.Generator

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_starts": self.n_starts,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "global_batch", "n_starts"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]} but this sampler has {getattr(self, k)}")
        self.seed, self.step = state["seed"], state["step"]
        self._rng.bit_generator.state = state["rng"]


class WindowSampler(_SeededSampler):
    """Random training windows of seq_len + 1 tokens, deterministic, resumable and disjoint across ranks.

    Each step every rank draws the same global batch of batch_size * world_size distinct start offsets from
    one seeded generator and keeps its own slice, so ranks never share a window and the union over ranks
    equals the batch of a single process with the global batch size. `batch_size` is per rank.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n_starts = len(tokens) - seq_len  # start offsets 0 .. len - (seq_len + 1)
        self.global_batch = batch_size * world_size
        if self.n_starts < self.global_batch:
            raise ValueError(
                f"{len(tokens):,} tokens are too few for {self.global_batch} distinct windows of "
                f"seq_len + 1 = {seq_len + 1}; lower seq_len or batch_size"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._arange = np.arange(seq_len + 1)

    def next_offsets(self) -> np.ndarray:
        """This rank's start offsets for the next batch (advances the sampler)."""
        starts = self._rng.choice(self.n_starts, size=self.global_batch, replace=False)
        self.step += 1
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, seq_len) int64, with y[:, t] = x[:, t + 1] in the token stream."""
        idx = self.next_offsets()[:, None] + self._arange  # (B, T + 1)
        w = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return w[:, :-1], w[:, 1:]


IGNORE_INDEX = -100  # a target the loss skips (roformer.kernels.cross_entropy's default ignore_index)


def example_batch(split, idx: np.ndarray, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task examples ``idx`` of ``split`` (a TokenSplit of task examples) as (x, y), both (len(idx), width) int64:
    x the example without its last token, right-padded with the split's pad_id; y the next tokens where they are
    scored (``split.scored``: the answer's tokens and the final EOD, less any the asker supplies), IGNORE_INDEX on
    the prompt, the supplied tokens and the padding. ``width``: the longest example's length - 1 when None."""
    offsets = split.doc_offsets
    sizes = offsets[idx + 1] - offsets[idx]
    width = int(sizes.max()) - 1 if width is None else width
    x = np.full((len(idx), width), split.pad_id, dtype=np.int64)
    y = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(idx):
        s, e = int(offsets[i]), int(offsets[i + 1])
        ex = np.asarray(split.tokens[s:e], dtype=np.int64)
        x[row, : e - s - 1] = ex[:-1]
        # position t predicts token t + 1: the first answer token from the prompt's last
        y[row, : e - s - 1] = np.where(split.scored[s + 1 : e], ex[1:], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


class ExampleSampler(_SeededSampler):
    """Random batches of whole task examples (data=task), the loss on their answers only: deterministic, resumable
    and disjoint across ranks, as WindowSampler.

    Each step every rank draws the same global batch of batch_size * world_size distinct example indices from one
    seeded generator and keeps its own slice. Every batch is padded to one width, the longest training example's
    length - 1 (at most ``seq_len``), so that every step has the same shape; ``seq_len`` below is that width. The
    state has WindowSampler's keys (``n_starts`` is the number of examples), so roformer.resume treats both alike.
    """

    def __init__(self, split, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if split.prompt_lens is None or split.scored is None:
            raise ValueError(f"the {split.name} split holds no task examples (no prompt lengths); use WindowSampler")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        width = int(np.diff(split.doc_offsets).max()) - 1
        if width > seq_len:
            raise ValueError(f"the longest training example has {width + 1} tokens: trainer.seq_len={seq_len} must be "
                             f"at least {width}")
        self.n_starts = split.n_docs
        self.global_batch = batch_size * world_size
        if self.n_starts < self.global_batch:
            raise ValueError(f"{self.n_starts} training examples are too few for a global batch of "
                             f"{self.global_batch}; raise data.task_train_size or lower trainer.batch_size")
        self.split, self.seq_len, self.batch_size = split, width, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next_offsets(self) -> np.ndarray:
        """This rank's example indices for the next batch (advances the sampler)."""
        idx = self._rng.choice(self.n_starts, size=self.global_batch, replace=False)
        self.step += 1
        return idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, seq_len) int64: see :func:`example_batch`."""
        return example_batch(self.split, self.next_offsets(), self.seq_len)
