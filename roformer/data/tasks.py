"""Algorithmic tasks as a corpus (``data=task data.task=NAME``): seeded generators, each task's word-level
vocabulary, and the encoded examples that training, validation and scoring read.

The tasks and their formats follow Kazemnejad et al. (2023), "The Impact of Positional Encoding on Length
Generalization in Transformers", App. D.1, where the paper gives one; associative recall is ours, in the bare form
of the multi-query associative recall of Arora et al. (2023, "Zoology"). An example is a prompt and an answer,
written as words separated by single spaces (one word = one token)::

    copy                Copy the following words: ba ko mi           -> ba ko mi
    reverse             Reverse the following words: ba ko mi        -> mi ko ba
    addition            Compute: 5 3 7 2 6 + 1 9 1 7 7 ?             -> The answer is 7 2 9 0 3 .
    sorting             Sort the following numbers: 42 7 19          -> The answer is 7 19 42 .
    parity              Is the number of 1's even in [ 1 0 0 1 1 ] ? -> The answer is No .
    summation           Compute: 3 + 5 + 9 ?                         -> The answer is 7 .
    associative_recall  ba 3 ko 7 mi 1                               -> [ko] 7 [mi] 1 [ba] 3

Conventions. Addition writes every number most significant digit first, as the paper's example does
(53726 + 19177 = 72903); both operands have the instance's number of digits, with no leading zero (a one-digit
operand may be 0), and the sum has no leading zero. Sorting's numbers are single tokens 0-99, drawn with
replacement and sorted ascending. Summation is the sum of the digits mod 10. Parity answers whether the count of
1s is even. Copy and reverse draw their words with replacement from 100 two-letter syllables (``ba`` .. ``zu``).

Associative recall writes n key-value pairs, keys drawn from the same syllables without replacement (so at most 100
pairs) and values from the digits; the answer asks every key once, in a random order, each followed by its value.
The keys in the answer (in brackets above) are the asker's: the model reads them but is neither trained nor scored
on them (:attr:`Task.given`), so the answer is right when every value is. The form has no template word and no
separator because one token that is the same in every example was enough to keep the tiny model from learning the
lookup (it answered with any value of the example, 54-63% exact match; docs/generalization/README.md). For the same
reason recall trains on instances of exactly L pairs (:attr:`Task.train_at_max`): with 1..L the one- and two-pair
instances, answered by copying any value, stalled it as well. Its test bins still start at one pair.

The instance length is counted in the task's own unit (:attr:`Task.unit`): words, digits per operand, numbers,
bits, terms or pairs. Training instances have a length drawn uniformly from 1..L (``data.task_max_len``; recall:
exactly L); test bins cover 1..L, L+1..2L, ... up to ``data.task_test_max_mult`` x L (:func:`length_bins`).

Tokens: every task has its own vocabulary, the four specials first (:data:`PAD_ID` 0, :data:`EOD_ID` 1 the
end-of-example token ``data.eod_token``, 2 ``<unk>``, :data:`SEP_ID` 3 ``<sep>``), then the template's words and
the task's symbols in a fixed order; :func:`tokenizer` is the matching ``tokenizers`` WordLevel model (whitespace
split, nothing trained). An encoded example is ``prompt + [SEP] + answer + [EOD]``: the separator marks where the
answer starts, which the text formats leave implicit for copy, reverse and sorting (without it a model that copies
by matching tokens runs on past the last word, and one cannot tell where to start copying). Recall has no separator
(:attr:`Task.separator`): its answer starts with the first key asked again. The prompt part, whose length training
and scoring use, is ``prompt + [SEP]``; the loss and the exact-match score are on the tokens the model must produce
(:attr:`Examples.scored`): ``answer + [EOD]``, or recall's values. To prompt a task model with text, end the prompt
with `` <sep>`` (recall: with a key of the prompt).

Randomness: :func:`generate` draws from ``numpy.random.default_rng([seed, *stream])``; the splits and the scored
bins use distinct streams (:data:`STREAMS`), so they are reproducible from ``data.task_seed`` and never share a
random sequence (short instances still repeat across splits: there are only so many of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from roformer.data.tokenizer import EOD_TOKEN

PAD_TOKEN, UNK_TOKEN, SEP_TOKEN = "<pad>", "<unk>", "<sep>"
PAD_ID, EOD_ID, UNK_ID, SEP_ID = 0, 1, 2, 3
# numpy seed streams, after data.task_seed: one per split, and the scored bins (followed by the bin's bounds)
STREAMS = {"train": (0,), "validation": (1,), "test": (2,), "bins": (3,)}

SYLLABLES = tuple(c + v for c in "bcdfghjklmnpqrstvwxz" for v in "aeiou")  # 100 words for copy/reverse/recall keys
DIGITS = tuple(str(d) for d in range(10))
NUMBERS = tuple(str(n) for n in range(100))  # sorting: single-token numbers

Words = list[str]


@dataclass(frozen=True)
class Task:
    """One task: its name, length unit, default L, vocabulary and generator."""

    name: str
    unit: str
    """What the instance length counts."""
    default_max_len: int
    """L when data.task_max_len is null: what configs/data_preset/task.yaml's tiny model learns to >= 90% exact match
    in distribution within its steps (docs/generalization/ has the figures); the paper's L is 20 (8 for the
    math tasks), for a 12-layer model trained 40K steps."""
    words: tuple[str, ...]
    """The template's words, then the symbols; the vocabulary is the specials followed by these."""
    make: Callable[[np.random.Generator, int], tuple[Words, Words]]
    """(rng, length) -> (prompt words, answer words)."""
    max_len: int | None = None
    """The longest instance the generator can make (associative recall: one key per pair); None: no limit."""
    separator: bool = True
    """Whether ``<sep>`` ends the prompt (recall: no, its first key asked again starts the answer)."""
    given: frozenset[str] = frozenset()
    """Answer words the asker supplies (recall: the keys): read by the model, neither trained nor scored on, and with
    them the end of the example is the asker's too (its EOD is not scored either)."""
    train_at_max: bool = False
    """Training and validation instances all have length L, not 1..L (recall: see the module docstring)."""
    default_steps: int = 1000
    """trainer.max_steps of configs/data_preset/task.yaml's tiny run for this task (``${task_steps:...}``)."""


def _pick(rng: np.random.Generator, symbols: tuple[str, ...], n: int) -> Words:
    return [symbols[i] for i in rng.integers(0, len(symbols), size=n)]


def _copy(rng, n):
    words = _pick(rng, SYLLABLES, n)
    return ["Copy", "the", "following", "words:", *words], words


def _reverse(rng, n):
    words = _pick(rng, SYLLABLES, n)
    return ["Reverse", "the", "following", "words:", *words], words[::-1]


def _operand(rng, n: int) -> str:
    """The digits of a number of exactly n digits (0-9 when n is 1), drawn digit by digit: any n fits."""
    digits = rng.integers(0, 10, size=n)
    if n > 1:
        digits[0] = rng.integers(1, 10)
    return "".join(DIGITS[d] for d in digits)


def _addition(rng, n):
    a, b = _operand(rng, n), _operand(rng, n)
    return ["Compute:", *a, "+", *b, "?"], ["The", "answer", "is", *str(int(a) + int(b)), "."]


def _sorting(rng, n):
    numbers = rng.integers(0, len(NUMBERS), size=n)
    return (["Sort", "the", "following", "numbers:", *(NUMBERS[i] for i in numbers)],
            ["The", "answer", "is", *(NUMBERS[i] for i in np.sort(numbers)), "."])


def _parity(rng, n):
    bits = rng.integers(0, 2, size=n)
    even = int(bits.sum()) % 2 == 0
    return (["Is", "the", "number", "of", "1's", "even", "in", "[", *(DIGITS[b] for b in bits), "]", "?"],
            ["The", "answer", "is", "Yes" if even else "No", "."])


def _summation(rng, n):
    terms = rng.integers(0, 10, size=n)
    prompt = ["Compute:"]
    for i, t in enumerate(terms):
        prompt += [DIGITS[t]] if i == 0 else ["+", DIGITS[t]]
    return [*prompt, "?"], ["The", "answer", "is", DIGITS[int(terms.sum()) % 10], "."]


def _recall(rng, n):
    keys = [SYLLABLES[k] for k in rng.choice(len(SYLLABLES), size=n, replace=False)]
    values = [DIGITS[v] for v in rng.integers(0, 10, size=n)]
    pairs = [w for kv in zip(keys, values, strict=True) for w in kv]
    return pairs, [w for q in rng.permutation(n) for w in (keys[q], values[q])]


_ANSWER = ("The", "answer", "is", ".")
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("copy", "words", 10, ("Copy", "the", "following", "words:", *SYLLABLES), _copy),
    Task("reverse", "words", 10, ("Reverse", "the", "following", "words:", *SYLLABLES), _reverse),
    Task("addition", "digits per operand", 2, ("Compute:", "+", "?", *_ANSWER, *DIGITS), _addition),
    Task("sorting", "numbers", 10, ("Sort", "the", "following", "numbers:", *_ANSWER, *NUMBERS), _sorting),
    Task("parity", "bits", 5, ("Is", "the", "number", "of", "1's", "even", "in", "[", "]", "?", *_ANSWER, "Yes", "No",
                               "0", "1"), _parity),
    Task("summation", "terms", 4, ("Compute:", "+", "?", *_ANSWER, *DIGITS), _summation),
    Task("associative_recall", "pairs", 4, (*SYLLABLES, *DIGITS), _recall, max_len=len(SYLLABLES), separator=False,
         given=frozenset(SYLLABLES), train_at_max=True, default_steps=3000),
)}
TASK_NAMES = tuple(TASKS)


def vocabulary(task: str, eod_token: str = EOD_TOKEN) -> list[str]:
    """The task's words in id order: the specials, then the task's words (each once, first place kept)."""
    words = [PAD_TOKEN, eod_token, UNK_TOKEN, SEP_TOKEN]
    for w in TASKS[task].words:
        if w not in words:
            words.append(w)
    return words


def tokenizer(task: str, eod_token: str = EOD_TOKEN) -> Tokenizer:
    """The task's WordLevel tokenizer: whitespace split, one id per word of :func:`vocabulary`, specials marked so
    that ``decode(ids, skip_special_tokens=True)`` gives the plain text back."""
    vocab = {w: i for i, w in enumerate(vocabulary(task, eod_token))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([PAD_TOKEN, eod_token, UNK_TOKEN, SEP_TOKEN])  # in the vocabulary: they keep ids 0-3
    return tok


def sample(task: str, length: int, rng: np.random.Generator) -> tuple[str, str]:
    """One instance of ``length`` (in the task's unit): (prompt text, answer text)."""
    prompt, answer = TASKS[task].make(rng, length)
    return " ".join(prompt), " ".join(answer)


def train_lengths(task: str, max_len: int) -> tuple[int, int]:
    """(lo, hi): the instance lengths training and validation draw from, 1..L, or L..L for a task that trains at L
    only (:attr:`Task.train_at_max`)."""
    return (max_len if TASKS[task].train_at_max else 1), max_len


def length_bins(max_len: int, mult: int) -> list[tuple[int, int]]:
    """The test bins of instance lengths: (1, L), (L + 1, 2L), ..., ((mult - 1) L + 1, mult L)."""
    return [(1 if i == 0 else i * max_len + 1, (i + 1) * max_len) for i in range(mult)]


@dataclass
class Examples:
    """Encoded examples: example i is ``tokens[offsets[i]:offsets[i + 1]]`` = prompt + [SEP] + answer + [EOD], its
    first ``prompt_lens[i]`` tokens the prompt and the separator (recall: no separator); ``scored`` marks the tokens
    the model must produce, which the loss and the score are on; ``lengths[i]`` is its instance length in the task's
    unit."""

    tokens: np.ndarray  # (n_tokens,) uint16
    offsets: np.ndarray  # (n + 1,) int64
    prompt_lens: np.ndarray  # (n,) int64
    scored: np.ndarray  # (n_tokens,) bool: the answer's tokens and EOD, less the task's given words (and then EOD)
    lengths: np.ndarray  # (n,) int64
    n_bytes: int  # UTF-8 bytes of the texts "prompt answer"

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def generate(task: str, n: int, lo: int, hi: int, seed: int, stream: tuple[int, ...]) -> Examples:
    """``n`` examples of ``task`` with instance lengths drawn uniformly from lo..hi, from the numpy generator
    seeded with ``[seed, *stream]``: the same arguments give the same examples on every machine."""
    spec = TASKS[task]
    if not 1 <= lo <= hi:
        raise ValueError(f"instance lengths {lo}..{hi}: need 1 <= lo <= hi")
    if spec.max_len is not None and hi > spec.max_len:
        raise ValueError(f"{task} makes instances of at most {spec.max_len} {spec.unit}, not {hi}")
    ids = {w: i for i, w in enumerate(vocabulary(task))}  # the end-of-example token's name changes no id
    rng = np.random.default_rng([seed, *stream])
    lengths = rng.integers(lo, hi + 1, size=n)
    sep = [SEP_ID] if spec.separator else []
    pieces, marks, prompt_lens, n_bytes = [], [], np.empty(n, dtype=np.int64), 0
    for i, length in enumerate(lengths):
        prompt, answer = spec.make(rng, int(length))
        pieces.append([ids[w] for w in prompt] + sep + [ids[w] for w in answer] + [EOD_ID])
        marks.append([False] * (len(prompt) + len(sep)) + [w not in spec.given for w in answer] + [not spec.given])
        prompt_lens[i] = len(prompt) + len(sep)
        n_bytes += len(" ".join(prompt + answer).encode("utf-8"))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.fromiter((t for p in pieces for t in p), dtype=np.uint16, count=int(offsets[-1]))
    scored = np.fromiter((m for ms in marks for m in ms), dtype=bool, count=int(offsets[-1]))
    return Examples(tokens, offsets, prompt_lens, scored, lengths.astype(np.int64), n_bytes)
