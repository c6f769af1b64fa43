"""Retrieval probes beside perplexity: can a model use what it read far back? Pure functions: prompt builders,
scorers that take a model and token ids, and :func:`run_probes`, one model's cells. eval_run.py runs them after a
checkpoint's perplexity cells (``eval.probes=[passkey,copy]``); probe_report.py writes their tables.

* ``passkey`` (Mohtashami & Jaggi, 2023, "Landmark Attention", Fig. 3a; the protocol of PI, Chen et al. 2023, and
  YaRN, Peng et al. 2023): an instruction line, filler ("The grass is green. ..." repeated), the line "The pass key
  is X. Remember it. X is the pass key." with a fraction ``depth`` of the filler before it, the rest of the
  filler, and "What is the pass key? The pass key is". X is a random 5-digit number, as PI and YaRN say. Scored
  two ways: greedy decoding (the first integer in up to 10 new tokens equals X, as the reference code scores it)
  and, because a small model trained on plain text never learned to follow the instruction, the rank of X's
  teacher-forced log-likelihood among :data:`DISTRACTORS` other random 5-digit keys (chance: mean rank
  (K + 2) / 2, top-1 rate 1 / (K + 1)). A length L is the most positions a trial reads: the prompt fills
  L - 9 of them (grown a filler sentence at a time, the prompt never longer), the answer the rest (the 10th
  new token is never read back).
* ``copy``: a span of random ordinary tokens at position 0, real text of the evaluation split, then the span
  again starting ``distance`` tokens after the first; loss and top-1 accuracy on the second copy's tokens but its
  first (each predictable only by looking back ``distance`` tokens).

Each (probe, length or distance, depth) cell draws its own keys, spans and filler offsets from
``eval.probe_seed``, so every checkpoint gets the same trials and two runs give the same numbers. A cell beyond
the scheme's position table is ``n/a``, as in the perplexity tables.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from roformer.evaluation import EvalSettings, Probe
from roformer.model import KVCache
from roformer.positional import PositionOutOfRange, RopeScaling

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"
GEN_TOKENS = 10  # greedy decoding reads the first integer in this many new tokens (the reference code's 10)
DISTRACTORS = 9  # K: other keys the true key is ranked among
METRICS = {Probe.passkey: ("exact_match", "key_rank", "key_top1"), Probe.copy: ("loss", "top1")}
CHANCE = {"key_rank": (DISTRACTORS + 2) / 2, "key_top1": 1 / (DISTRACTORS + 1)}


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(n: int) -> str:
    """The first ``n`` filler sentences, the five repeated in order."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(n))


def passkey_text(n_before: int, n_after: int, key: int) -> str:
    """The prompt with ``n_before`` filler sentences before the key line and ``n_after`` after it; lines joined by
    newlines, as in the reference code."""
    return "\n".join((INTRO, filler(n_before), key_line(key), filler(n_after), QUESTION))


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: int
    n_before: int  # filler sentences before the key line
    n_after: int


def passkey_prompt(encode: Callable[[str], list[int]], target: int, depth: float, key: int,
                   n_hint: int | None = None) -> PasskeyPrompt | None:
    """The prompt with the most filler sentences whose tokens are at most ``target`` (round(depth * n) of the n
    before the key); None when even the prompt without filler is longer. ``n_hint``: a first guess of n (the
    previous trial's), else estimated from the filler's tokens per sentence."""

    def make(n: int) -> PasskeyPrompt:
        before = int(depth * n + 0.5)
        return PasskeyPrompt(encode(passkey_text(before, n - before, key)), key, before, n - before)

    p = make(0)
    if len(p.ids) > target:
        return None
    if n_hint is None:
        per_sentence = len(encode(" " + filler(len(FILLER)))) / len(FILLER)
        n_hint = int((target - len(p.ids)) / per_sentence)
    n = max(0, n_hint)
    p = make(n)
    while len(p.ids) > target:  # the guess was long: fewer sentences
        n -= 1
        p = make(n)
    while len((q := make(n + 1)).ids) <= target:  # then as many as fit
        n, p = n + 1, q
    return p


def random_keys(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` distinct random 5-digit numbers."""
    keys: list[int] = []
    while len(keys) < n:
        k = int(rng.integers(10_000, 100_000))
        if k not in keys:
            keys.append(k)
    return keys


def ordinary_ids(tok) -> np.ndarray:
    """Every id of the tokenizer but its special tokens (the end-of-document token)."""
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return np.array([i for i in range(tok.get_vocab_size(with_added_tokens=True)) if i not in special], np.int64)


def copy_row(rng: np.random.Generator, ordinary: np.ndarray, stream: np.ndarray, distance: int, span: int):
    """span, ``distance - span`` tokens of ``stream`` from a random offset, span: ``distance + span`` ids."""
    s = rng.choice(ordinary, span)
    start = int(rng.integers(0, len(stream) - (distance - span) + 1))
    return np.concatenate([s, np.asarray(stream[start : start + distance - span], dtype=np.int64), s])


def copy_distances(train_len: int, lengths: list[int]) -> list[int]:
    """L/4, L/2, L, 2L, ... up to the largest evaluation length."""
    d, out = max(1, train_len // 4), []
    while d <= max(lengths):
        out.append(d)
        d *= 2
    return out


# ----------------------------------------------------------------------------------------------------------
# Scorers: a model and token ids in, numbers out


def _autocast(device, bf16: bool):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


@torch.inference_mode()
def score_passkey(model, prompt: list[int], answers: list[list[int]], *, stop_id: int | None, device,
                  bf16: bool = False) -> tuple[list[int], list[float]]:
    """(greedy new tokens after ``prompt``, up to GEN_TOKENS and stopping before ``stop_id``; the teacher-forced
    log-likelihood of each answer after it). The prompt is read once into a KV cache; each answer continues a
    copy of it, and greedy decoding the cache itself, so a trial costs one forward of the prompt."""
    if max(map(len, answers)) > GEN_TOKENS:
        raise ValueError(f"an answer of {max(map(len, answers))} tokens; at most {GEN_TOKENS} fit a trial")
    cache = KVCache(capacity=len(prompt) + GEN_TOKENS - 1)
    with _autocast(device, bf16):
        logits, _ = model(torch.tensor([prompt], device=device), cache=cache)  # (1, P, V)
    first = logits[0, -1].float().log_softmax(-1)
    lls = []
    for ans in answers:
        ll = float(first[ans[0]])
        if len(ans) > 1:
            with _autocast(device, bf16):
                rest, _ = model(torch.tensor([ans[:-1]], device=device), cache=copy.deepcopy(cache))  # (1, m-1, V)
            lp = rest[0].float().log_softmax(-1)
            ll += float(lp[torch.arange(len(ans) - 1), torch.tensor(ans[1:], device=lp.device)].sum())
        lls.append(ll)
    new, tok = [], logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    for i in range(GEN_TOKENS):
        if int(tok) == stop_id:
            break
        new.append(int(tok))
        if i + 1 < GEN_TOKENS:
            with _autocast(device, bf16):
                tok = model.decode_step(tok, cache)[:, -1].argmax(-1, keepdim=True)
    return new, lls


def rank_of_first(lls: list[float]) -> tuple[float, float]:
    """(rank of lls[0] among all, 1 = best; the chance it is ranked first), ties broken at random in expectation:
    a model that gives every answer the same likelihood gets exactly the chance values."""
    x = np.asarray(lls)
    greater, ties = int((x[1:] > x[0]).sum()), int((x[1:] == x[0]).sum())
    return 1 + greater + ties / 2, (greater == 0) / (1 + ties)


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@torch.inference_mode()
def score_copy(model, rows: np.ndarray, distance: int, span: int, *, device, bf16: bool = False,
               batch_tokens: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``copy_row``: (mean loss, top-1 accuracy) on the second copy's tokens but its first. Rows are
    read in batches of at most ``batch_tokens`` input tokens."""
    n = rows.shape[1] - 1
    per_batch = max(1, batch_tokens // n)
    loss, acc = [], []
    for b in range(0, len(rows), per_batch):
        t = torch.from_numpy(rows[b : b + per_batch]).to(device)
        with _autocast(device, bf16):
            logits, _ = model(t[:, :-1])
        lg = logits[:, distance : distance + span - 1].float()  # (B, span-1, V): predictions of the copy's tokens
        y = t[:, distance + 1 : distance + span]
        loss.append(F.cross_entropy(lg.transpose(1, 2), y, reduction="none").mean(1).double().cpu().numpy())
        acc.append((lg.argmax(-1) == y).double().mean(1).cpu().numpy())
    return np.concatenate(loss), np.concatenate(acc)


# ----------------------------------------------------------------------------------------------------------
# One model's cells


@dataclass
class ProbeCell:
    """One probe metric at one length (passkey, with its depth) or distance (copy), over ``n`` trials."""

    probe: str
    metric: str
    value: float | None
    n: int
    length: int | None = None  # passkey: the most positions a trial reads
    distance: int | None = None  # copy: from the first copy's first token to the second's
    depth: float | None = None  # passkey: the fraction of the filler before the key
    status: str = "ok"  # ok | n/a | skipped
    note: str = ""
    prompt_tokens: float | None = None  # passkey: the prompts' mean length in tokens
    chance: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _rng(settings: EvalSettings, probe: Probe, *where: float) -> np.random.Generator:
    """The cell's own generator: the same trials for every checkpoint, whatever else is evaluated."""
    return np.random.default_rng([settings.probe_seed, list(Probe).index(probe), *(round(w * 1e6) for w in where)])


def _unscored(probe: Probe, status: str, note: str, **where) -> list[ProbeCell]:
    return [ProbeCell(probe.value, m, None, 0, status=status, note=note, **where) for m in METRICS[probe]]


def passkey_cells(model, tok, L: int, depth: float, settings: EvalSettings, *, eod_id: int, device) -> list[ProbeCell]:
    """Every passkey metric at length L and one depth, over ``eval.probe_trials`` random keys."""
    rng, encode = _rng(settings, Probe.passkey, L, depth), (lambda s: tok.encode(s, add_special_tokens=False).ids)
    exact, ranks, top1, lengths, n_hint = [], [], [], [], None
    for _ in range(settings.probe_trials):
        key, *others = random_keys(rng, 1 + DISTRACTORS)
        p = passkey_prompt(encode, L - (GEN_TOKENS - 1), depth, key, n_hint)
        if p is None:
            need = len(encode(passkey_text(0, 0, key))) + GEN_TOKENS - 1
            return _unscored(Probe.passkey, "skipped", f"the prompt without filler needs L >= {need}", length=L,
                             depth=depth)
        n_hint = p.n_before + p.n_after
        new, lls = score_passkey(model, p.ids, [encode(f" {k}") for k in (key, *others)], stop_id=eod_id,
                                 device=device, bf16=settings.bf16)
        exact.append(first_integer(tok.decode(new)) == key)
        rank, first = rank_of_first(lls)
        ranks.append(rank)
        top1.append(first)
        lengths.append(len(p.ids))
    common = dict(n=len(exact), length=L, depth=depth, prompt_tokens=float(np.mean(lengths)))
    return [ProbeCell("passkey", "exact_match", float(np.mean(exact)), **common),
            ProbeCell("passkey", "key_rank", float(np.mean(ranks)), chance=CHANCE["key_rank"], **common),
            ProbeCell("passkey", "key_top1", float(np.mean(top1)), chance=CHANCE["key_top1"], **common)]


def copy_cells(model, ordinary: np.ndarray, stream: np.ndarray, d: int, settings: EvalSettings, *,
               device) -> list[ProbeCell]:
    """Both copy metrics at distance d, over ``eval.probe_trials`` random spans and filler offsets."""
    s = settings.copy_span
    if d < s:
        return _unscored(Probe.copy, "skipped", f"distance {d} is shorter than eval.copy_span={s}", distance=d)
    if len(stream) < d - s:
        return _unscored(Probe.copy, "skipped", f"the split has {len(stream)} tokens; the filler needs {d - s}",
                         distance=d)
    rng = _rng(settings, Probe.copy, d)
    rows = np.stack([copy_row(rng, ordinary, stream, d, s) for _ in range(settings.probe_trials)])
    loss, acc = score_copy(model, rows, d, s, device=device, bf16=settings.bf16, batch_tokens=settings.batch_tokens)
    return [ProbeCell("copy", "loss", float(loss.mean()), len(rows), distance=d),
            ProbeCell("copy", "top1", float(acc.mean()), len(rows), distance=d)]


def probe_units(settings: EvalSettings, lengths: list[int], train_len: int) -> list[tuple[Probe, dict, int]]:
    """Every (probe, where, positions read at most) one model's probes score, in order."""
    units = []
    for probe in settings.probes:
        if probe == Probe.passkey:
            units += [(probe, {"length": L, "depth": dp}, L) for L in lengths for dp in settings.probe_depths]
        else:
            s = settings.copy_span
            units += [(probe, {"distance": d}, d + s - 1) for d in copy_distances(train_len, lengths)]
    return units


def probe_cost(settings: EvalSettings, lengths: list[int], train_len: int, table: int | None) -> int:
    """Input tokens the probes read, about (a progress bar's unit): each trial reads its length once."""
    return sum(n * settings.probe_trials for _, _, n in probe_units(settings, lengths, train_len)
               if table is None or n <= table)


def run_probes(model, *, tok, eod_id: int, stream: np.ndarray, lengths: list[int], train_len: int,
               settings: EvalSettings, scaling: RopeScaling, device, on_cell=None) -> list[ProbeCell]:
    """Every probe cell of ``settings.probes`` for one model and one RoPE scaling method (its factor: the positions
    a cell reads / the training length). ``on_cell(tokens)``, if given, is called after each length or distance
    with the input tokens it read (as :func:`probe_cost` counts them)."""
    table = model.pos.max_positions(model.pos_cfg)  # None: any length
    ordinary = ordinary_ids(tok)
    cells = []
    for probe, where, n in probe_units(settings, lengths, train_len):
        if table is not None and n > table:
            cells += _unscored(probe, "n/a", f"n/a (table size {table})", **where)
            continue
        try:
            with model.scaled_positions(scaling, n / train_len, train_len):
                if probe == Probe.passkey:
                    cells += passkey_cells(model, tok, where["length"], where["depth"], settings, eod_id=eod_id,
                                           device=device)
                else:
                    cells += copy_cells(model, ordinary, stream, where["distance"], settings, device=device)
        except PositionOutOfRange as e:
            cells += _unscored(probe, "n/a", str(e), **where)
        if on_cell:
            on_cell(n * settings.probe_trials)
    return cells
