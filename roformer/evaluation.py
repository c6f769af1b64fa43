"""Pure scoring: perplexity beyond the training length by three protocols, per-position loss, and the cells of
one model (with a zero-shot RoPE extension). What evaluate.py does with checkpoints and files is eval_run.py's.

Every protocol scores every target token exactly once and reports how many it scored. Windows always start at
position 0, as a model sees them in training; only the context before each scored token changes.

* ``nonoverlapping`` (Press et al., 2022, the ALiBi extrapolation tables): consecutive windows of L tokens.
  The first token of each window has no context, so short windows are penalised by the context they lack.
* ``sliding`` with stride S: windows of L tokens that advance by S; a window scores only the targets the
  previous one did not, so every scored token (after the first window) has at least L - S tokens of context.
  The token count is exact: the Hugging Face recipe's off-by-one per window does not happen here.
* ``fixed_target`` (Kazemnejad et al., 2023): the last K tokens of every document long enough for the largest
  length (the first ``max_docs`` of them), scored with a window of L tokens ending at the document's end, so the
  targets are identical at every length and only the context changes. K is ``target_tokens``, lowered to the
  smallest length when that is shorter, and is the same at every length of a model.

For the first two, every length scores the same stretch: the first M + 1 tokens of the split's stream (M =
``max_tokens``, raised to the largest length, or the whole split), so perplexities at different lengths are
comparable.

Metrics: token perplexity exp(NLL / tokens), bits per byte NLL / ln 2 / bytes, and word-level perplexity
exp(NLL / words), where bytes are the UTF-8 bytes the scored tokens stand for (the end-of-document token counts
as one byte, a separator) and words are the whitespace-separated words of their text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers

from roformer.positional import PositionOutOfRange, RopeScaling


class Protocol(str, Enum):
    nonoverlapping = "nonoverlapping"
    sliding = "sliding"
    fixed_target = "fixed_target"


class Probe(str, Enum):
    """Retrieval probes evaluate.py can run beside perplexity (roformer/probes.py)."""

    passkey = "passkey"
    copy = "copy"


class OnShort(str, Enum):
    skip = "skip"  # mark the cell skipped, with the reason, and go on
    error = "error"  # stop with the reason


DEFAULT_MULTIPLIERS = [1.0, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0]


@dataclass
class EvalSettings:
    """What to score and how (the ``eval`` node of ``configs/evaluate.yaml``)."""

    # evaluation lengths in tokens; empty: the checkpoint's training length times each multiplier
    lengths: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=lambda: list(DEFAULT_MULTIPLIERS))
    protocols: list[Protocol] = field(
        default_factory=lambda: [Protocol.nonoverlapping, Protocol.sliding, Protocol.fixed_target]
    )
    # sliding window stride in tokens; 0: half of each length
    stride: int = 0
    # fixed_target: number of final tokens of each document that are scored (K); lowered to the smallest
    # evaluated length when that is shorter, the same K at every length of a checkpoint
    target_tokens: int = 256
    # fixed_target: use at most this many of the long-enough documents, the first ones in order (0: all).
    # The default keeps a sweep's evaluation to minutes on a CPU; 0 scores all of them
    max_docs: int = 32
    # zero-shot context extension applied to RoPE checkpoints; each method's factor is length / training length
    rope_scaling: list[RopeScaling] = field(default_factory=lambda: [RopeScaling.none])
    # the xPos paper's blockwise causal attention (its Table 2 applies it beyond the training length): checkpoints
    # whose scheme reads pos.bca_len and was trained without it are scored with it set to their training length
    # (variant <name>+bca); others as they are
    bca: bool = False
    split: str = "test"
    # nonoverlapping/sliding: score the first this many target tokens of the split, the same stretch at every
    # length (raised to the largest length so that it fits one window; 0: the whole split). The default keeps a
    # sweep's evaluation to minutes on a CPU; 0 scores everything
    max_tokens: int = 32768
    # tokens per forward batch (windows of one length are batched up to this many tokens)
    batch_tokens: int = 8192
    # bf16 autocast for the forward (the loss is always accumulated in float64)
    bf16: bool = False
    device: str = "auto"
    on_short: OnShort = OnShort.skip
    progress: bool = True
    # retrieval probes run after each checkpoint's perplexity cells (roformer/probes.py): passkey, copy; empty: none.
    # Names, not Probe: a bad one is then refused in one line below (Hydra's enum error takes several)
    probes: list[str] = field(default_factory=list)
    # the probes' trials are drawn from this seed: every checkpoint gets the same keys, spans and filler
    probe_seed: int = 0
    # random trials per passkey (length, depth) and per copy distance
    probe_trials: int = 5
    # passkey: the fractions of the filler before the key line
    probe_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    # copy: the random span's length in tokens (the first of its repeat is not scored)
    copy_span: int = 16
    # task checkpoints (data=task): greedy exact match on this many examples per length bin (roformer/tasks.py)
    task_examples: int = 200

    def __post_init__(self) -> None:
        self._check_probes()
        for L in self.lengths:
            if not isinstance(L, int) or isinstance(L, bool) or L < 1:
                raise ValueError(f"eval.lengths: {L!r} is not a positive integer number of tokens")
        for m in self.multipliers:
            if not m > 0:
                raise ValueError(f"eval.multipliers: {m!r} must be positive")
        if not self.protocols:
            raise ValueError(f"eval.protocols is empty; choose from {[p.value for p in Protocol]}")
        self.protocols = [Protocol(p) for p in self.protocols]
        self.rope_scaling = [RopeScaling(r) for r in self.rope_scaling] or [RopeScaling.none]
        self.on_short = OnShort(self.on_short)
        for key in ("stride", "max_tokens", "max_docs"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be >= 0")
        if self.target_tokens < 1 or self.batch_tokens < 1:
            raise ValueError("eval.target_tokens and eval.batch_tokens must be positive")
        if self.stride and self.lengths and self.stride > min(self.lengths):
            raise ValueError(
                f"eval.stride={self.stride} is larger than the length {min(self.lengths)}; "
                "a stride must be at most the window length"
            )

    def _check_probes(self) -> None:
        names = [p.value for p in Probe]
        for p in self.probes:
            if p not in names:
                raise ValueError(f"eval.probes: {p!r} is not a probe; choose from {names} (eval.probes=[] runs none)")
        self.probes = [Probe(p) for p in dict.fromkeys(self.probes)]
        if self.probe_seed < 0:
            raise ValueError(f"eval.probe_seed={self.probe_seed} must be >= 0")
        if self.probe_trials < 1:
            raise ValueError(f"eval.probe_trials={self.probe_trials} must be at least 1")
        if Probe.passkey in self.probes and not self.probe_depths:
            raise ValueError("eval.probe_depths is empty; give fractions of the filler before the key, e.g. [0.5]")
        for d in self.probe_depths:
            if not 0 <= d <= 1:
                raise ValueError(f"eval.probe_depths: {d!r} must be a fraction in [0, 1]")
        if self.task_examples < 1:
            raise ValueError(f"eval.task_examples={self.task_examples} must be at least 1")
        if self.copy_span < 2:
            raise ValueError(f"eval.copy_span={self.copy_span} must be at least 2 (its first token is not scored)")

    def lengths_for(self, train_len: int) -> list[int]:
        if self.lengths:
            return sorted(set(self.lengths))
        return sorted({max(1, round(m * train_len)) for m in self.multipliers})


@dataclass
class Score:
    """NLL summed over the scored tokens, with the counts it is a sum over."""

    nll_sum: float = 0.0
    n_tokens: int = 0
    n_bytes: int = 0
    n_words: int = 0
    pos_sum: np.ndarray | None = None  # per window position: summed NLL and count (nonoverlapping only)
    pos_count: np.ndarray | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.n_bytes if self.n_bytes else float("nan")

    @property
    def word_ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_words) if self.n_words else float("nan")


class ShortInput(ValueError):
    """The data is too short for a requested length."""


# ----------------------------------------------------------------------------------------------------------
# Windows: (start of the input in the stream, input length, number of trailing targets scored)


def nonoverlapping_windows(n_targets: int, length: int) -> Iterator[tuple[int, int, int]]:
    """Targets 1..M in consecutive windows of `length`; the last window may be shorter."""
    for s in range(0, n_targets, length):
        n = min(length, n_targets - s)
        yield s, n, n


def sliding_windows(n_targets: int, length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows of `length` advancing by `stride`; each scores the targets after the previous window's last."""
    if not 0 < stride <= length:
        raise ValueError(f"eval.stride={stride} must be in [1, length={length}]")
    done, start = 0, 0
    while done < n_targets:
        end = min(start + length, n_targets)  # this window's inputs are tokens[start:end], targets start+1..end
        yield start, end - start, end - done
        done, start = end, start + stride


# ----------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()  # scoring under any caller's grad mode: no graph is kept, and the result leaves as numpy
def token_nll(model, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Per-token NLL (B, T) in float32 for inputs x and targets y, windows starting at position 0."""
    dev = x.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        logits, _ = model(x)
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=dev)
    for s in range(0, T, 1024):  # bound the float32 copy of the logits
        e = min(s + 1024, T)
        out[:, s:e] = F.cross_entropy(
            logits[:, s:e].float().reshape(-1, V), y[:, s:e].reshape(-1), reduction="none"
        ).view(B, e - s)
    return out


def score_windows(model, stream: np.ndarray, windows, *, batch_tokens: int, bf16: bool, per_position: bool, device):
    """Score (start, n_in, n_scored) windows of `stream`: targets stream[start+1 : start+n_in+1], last n_scored.

    Windows of equal input length are batched together. Returns a Score without byte/word counts.
    """
    score = Score()
    if per_position:
        L = max(n for _, n, _ in windows)
        score.pos_sum, score.pos_count = np.zeros(L), np.zeros(L, dtype=np.int64)
    by_len: dict[int, list[tuple[int, int]]] = {}
    for start, n_in, n_sc in windows:
        by_len.setdefault(n_in, []).append((start, n_sc))
    for n_in, group in by_len.items():
        per_batch = max(1, batch_tokens // n_in)
        for b in range(0, len(group), per_batch):
            chunk = group[b : b + per_batch]
            rows = np.stack([stream[s : s + n_in + 1].astype(np.int64) for s, _ in chunk])
            t = torch.from_numpy(rows).to(device)
            nll = token_nll(model, t[:, :-1], t[:, 1:], bf16).double().cpu().numpy()  # (B, n_in)
            for row, (_, n_sc) in zip(nll, chunk, strict=True):
                scored = row[n_in - n_sc :]
                score.nll_sum += float(scored.sum())
                score.n_tokens += n_sc
                if per_position:
                    score.pos_sum[n_in - n_sc : n_in] += scored
                    score.pos_count[n_in - n_sc : n_in] += 1
    return score


@dataclass
class TextCounter:
    """Bytes and words that token ids stand for, from the tokenizer."""

    token_bytes: np.ndarray  # (V,) UTF-8 bytes of each id; special tokens count as 1 (a separator)
    tokenizer: object

    @classmethod
    def from_tokenizer(cls, tok) -> TextCounter:
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        V = tok.get_vocab_size(with_added_tokens=True)
        nbytes = np.zeros(V, dtype=np.int64)
        for i in range(V):
            s = tok.id_to_token(i)
            if s is None:
                continue
            if s in special:
                nbytes[i] = 1
            elif all(c in alphabet for c in s):  # byte-level symbol string: one character per byte
                nbytes[i] = len(s)
            else:
                nbytes[i] = len(tok.decode([i]).encode("utf-8"))
        return cls(nbytes, tok)

    def count(self, ids: np.ndarray) -> tuple[int, int]:
        ids = np.asarray(ids, dtype=np.int64)
        n_bytes = int(self.token_bytes[ids].sum())
        n_words = len(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).split())
        return n_bytes, n_words


def evaluate_stream(
    model,
    stream: np.ndarray,
    protocol: Protocol,
    length: int,
    *,
    n_targets: int,
    stride: int = 0,
    batch_tokens: int = 8192,
    bf16: bool = False,
    device="cpu",
    counter: TextCounter | None = None,
) -> Score:
    """Nonoverlapping or sliding perplexity of the first n_targets targets of a token stream."""
    if n_targets < length:
        raise ShortInput(
            f"length {length} needs at least {length + 1} tokens but the scored stretch has {n_targets + 1}"
        )
    if protocol == Protocol.nonoverlapping:
        windows = list(nonoverlapping_windows(n_targets, length))
    elif protocol == Protocol.sliding:
        windows = list(sliding_windows(n_targets, length, stride or max(1, length // 2)))
    else:
        raise ValueError(f"evaluate_stream does not run {protocol.value}; use evaluate_fixed_target")
    score = score_windows(
        model,
        stream,
        windows,
        batch_tokens=batch_tokens,
        bf16=bf16,
        per_position=protocol == Protocol.nonoverlapping,
        device=device,
    )
    assert score.n_tokens == n_targets, (score.n_tokens, n_targets)
    if counter is not None:
        score.n_bytes, score.n_words = counter.count(stream[1 : n_targets + 1])
    return score


def long_documents(docs: list[np.ndarray], max_length: int) -> list[np.ndarray]:
    """Documents long enough to hold a window of max_length inputs plus one target."""
    return [d for d in docs if len(d) >= max_length + 1]


def evaluate_fixed_target(
    model,
    docs: list[np.ndarray],
    length: int,
    *,
    target_tokens: int,
    batch_tokens: int = 8192,
    bf16: bool = False,
    device="cpu",
    counter: TextCounter | None = None,
) -> Score:
    """Score the last `target_tokens` tokens of each document with a window of `length` ending at its end."""
    if length < target_tokens:
        raise ShortInput(f"fixed_target needs length >= eval.target_tokens={target_tokens}, got length {length}")
    usable = [d for d in docs if len(d) >= length + 1]
    if not usable:
        raise ShortInput(f"no document has the {length + 1} tokens a window of {length} needs")
    stream = np.concatenate(usable)
    ends = np.cumsum([len(d) for d in usable])
    windows = [(int(e) - length - 1, length, target_tokens) for e in ends]
    score = score_windows(
        model, stream, windows, batch_tokens=batch_tokens, bf16=bf16, per_position=False, device=device
    )
    if counter is not None:
        for d in usable:
            b, w = counter.count(d[-target_tokens:])
            score.n_bytes += b
            score.n_words += w
    return score


# ----------------------------------------------------------------------------------------------------------
# What one model's cells score (shared by evaluate_model, eval_run's plan line and its progress bar)


def stream_targets(settings: EvalSettings, n_stream: int, lengths: list[int]) -> int:
    """M, the targets every nonoverlapping and sliding cell scores: ``max_tokens`` raised to the largest length
    (so every length has a full window), at most the split's; the whole split when ``max_tokens`` is 0."""
    if not settings.max_tokens:
        return n_stream - 1
    return min(n_stream - 1, max(settings.max_tokens, max(lengths)))


def fixed_target_tokens(settings: EvalSettings, lengths: list[int]) -> int:
    """K, the final tokens of each document that fixed_target scores: ``target_tokens``, lowered to the smallest
    length when that is shorter, so the targets are the same at every length of a model."""
    return min(settings.target_tokens, min(lengths))


def fixed_documents(docs: list[np.ndarray], lengths: list[int], settings: EvalSettings) -> list[np.ndarray]:
    """The documents fixed_target scores: those long enough for the largest length, the first ``max_docs``."""
    usable = long_documents(docs, max(lengths))
    return usable[: settings.max_docs] if settings.max_docs else usable


def cell_cost(protocol: Protocol, length: int, *, n_targets: int, stride: int, n_docs: int) -> int:
    """Input tokens the forward passes of one cell read (the progress bar's unit); 0 when the cell cannot run."""
    if protocol == Protocol.fixed_target:
        return n_docs * length
    if n_targets < length:
        return 0
    if protocol == Protocol.nonoverlapping:
        return n_targets
    return sum(n for _, n, _ in sliding_windows(n_targets, length, stride or max(1, length // 2)))


@dataclass
class Cell:
    """One (protocol, length) result for one model variant."""

    protocol: str
    length: int
    status: str  # ok | n/a | skipped
    note: str = ""
    score: Score | None = None
    target_tokens: int | None = None  # fixed_target: K, the final tokens of each document scored

    def as_dict(self) -> dict:
        d = {"protocol": self.protocol, "length": self.length, "status": self.status, "note": self.note}
        if self.target_tokens is not None:
            d["target_tokens"] = self.target_tokens
        s = self.score
        if s is not None:
            d.update(
                ppl=s.ppl,
                nll_sum=s.nll_sum,
                tokens=s.n_tokens,
                bytes=s.n_bytes,
                words=s.n_words,
                bits_per_byte=s.bits_per_byte,
                word_ppl=s.word_ppl,
            )
        return d


def evaluate_model(
    model,
    *,
    stream: np.ndarray,
    docs: list[np.ndarray],
    lengths: list[int],
    settings: EvalSettings,
    scaling: RopeScaling,
    train_len: int,
    counter: TextCounter | None,
    device,
    on_cell=None,
) -> tuple[list[Cell], dict]:
    """Every (protocol, length) cell for one model and one RoPE scaling method, plus its per-position loss.

    ``on_cell(cell)``, if given, is called after each cell.
    """
    n_targets = stream_targets(settings, len(stream), lengths)
    K = fixed_target_tokens(settings, lengths)
    fixed_docs = fixed_documents(docs, lengths, settings)
    common = dict(batch_tokens=settings.batch_tokens, bf16=settings.bf16, device=device, counter=counter)
    cells, per_pos = [], {}
    table = model.pos.max_positions(model.pos_cfg)  # None: any length
    for protocol in settings.protocols:
        k = K if protocol == Protocol.fixed_target else None
        for L in lengths:
            if table is not None and L > table:
                cell = Cell(protocol.value, L, "n/a", f"n/a (table size {table})", target_tokens=k)
            else:
                try:
                    with model.scaled_positions(scaling, L / train_len, train_len):  # none: as trained
                        if protocol == Protocol.fixed_target:
                            score = evaluate_fixed_target(model, fixed_docs, L, target_tokens=K, **common)
                        else:
                            score = evaluate_stream(
                                model, stream, protocol, L, n_targets=n_targets, stride=settings.stride, **common
                            )
                except ShortInput as e:
                    if settings.on_short == OnShort.error:
                        raise
                    cell = Cell(protocol.value, L, "skipped", str(e), target_tokens=k)
                except PositionOutOfRange as e:
                    cell = Cell(protocol.value, L, "n/a", str(e), target_tokens=k)
                else:
                    cell = Cell(protocol.value, L, "ok", score=score, target_tokens=k)
                    if protocol == Protocol.nonoverlapping:
                        per_pos[L] = (score.pos_sum / np.maximum(score.pos_count, 1)).tolist()
            cells.append(cell)
            if on_cell:
                on_cell(cell)
    return cells, per_pos
