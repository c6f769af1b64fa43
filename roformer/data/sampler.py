"""Training batches: random windows of a token stream, deterministic, resumable and split across DDP ranks."""

from __future__ import annotations

import numpy as np
import torch


class WindowSampler:
    """Random training windows of seq_len + 1 tokens, deterministic, resumable and disjoint across ranks.

    Each step every rank draws the same global batch of batch_size * world_size distinct start offsets from
    one seeded generator and keeps its own slice, so ranks never share a window and the union over ranks
    equals the batch of a single process with the global batch size. `batch_size` is per rank.

    `state_dict()` holds the generator state as plain Python ints; after `load_state_dict` the sampler draws
    exactly the batches the saved one would have drawn next (also with another world_size, as long as
    batch_size * world_size is unchanged).
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
