"""Byte-level BPE tokenizer: training, (de)serialisation and a stable hash.

The tokenizer is a GPT-2 style byte-level BPE built with Hugging Face `tokenizers`: text is split into
UTF-8 bytes, each byte mapped to one of 256 printable symbols, and merges are learned on top. Every string
therefore round-trips exactly (emoji, CJK, combining marks, control characters) and no `<unk>` exists.

One special token, the end-of-document marker `EOD_TOKEN`, is added. The data pipeline inserts it itself
after every document; text that happens to spell `<|endoftext|>` is encoded as ordinary bytes
(`encode_special_tokens = True`), so no document can forge a boundary.

The serialized JSON (`to_json`) is what checkpoints carry; `from_json` restores exactly the same tokenizer and
`tokenizer_hash` identifies it (sha256 of the canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from roformer.files import atomic_write

EOD_TOKEN = "<|endoftext|>"
N_BYTES = 256  # the byte alphabet every byte-level vocabulary must contain
MAX_VOCAB_SIZE = 2**32  # ids are stored as uint32 at most
# Bump when the way a tokenizer is trained changes, so token caches keyed on it are rebuilt.
TRAINER_VERSION = "bytelevel-bpe-v1"


class TokenizerError(ValueError):
    """A tokenizer cannot be built or loaded as asked."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= MAX_VOCAB_SIZE:
        return np.dtype(np.uint32)
    raise TokenizerError(f"vocab_size={vocab_size} does not fit uint32 token ids (max {MAX_VOCAB_SIZE})")


def check_vocab_size(vocab_size: int, n_special: int = 1) -> None:
    """Raise unless `vocab_size` holds the byte alphabet plus the specials and fits the id dtype."""
    smallest = N_BYTES + n_special
    if vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {smallest} ids "
            f"({N_BYTES} bytes + {n_special} special); use e.g. vocab_size=8192"
        )
    id_dtype(vocab_size)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    length: int | None = None,
    min_frequency: int = 2,
    eod_token: str = EOD_TOKEN,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` ids (fewer if the text has too few merges to learn).

    Deterministic for the same texts in the same order. `length` (the number of texts) only sizes the progress
    bar. The EOD token gets id 0.
    """
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    if progress:
        texts = tqdm(texts, total=length, desc="tokenizer: reading training split", unit="doc")
    tok.train_from_iterator(texts, trainer, length=length)
    tok.encode_special_tokens = True
    return tok


def ensure_eod(tok: Tokenizer, eod_token: str = EOD_TOKEN) -> int:
    """Return the id of `eod_token`, adding it as a special token when the tokenizer lacks it."""
    eod_id = tok.token_to_id(eod_token)
    if eod_id is None:
        tok.add_special_tokens([eod_token])
        eod_id = tok.token_to_id(eod_token)
    return eod_id


def to_json(tok: Tokenizer) -> str:
    """The serialized tokenizer, as carried in checkpoints."""
    return tok.to_str()


def from_json(s: str) -> Tokenizer:
    """Restore a tokenizer from `to_json` output (e.g. the string stored in a checkpoint)."""
    try:
        tok = Tokenizer.from_str(s)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"not a valid tokenizer JSON: {e}") from None
    tok.encode_special_tokens = True  # not part of the JSON; see the module docstring
    return tok


def tokenizer_hash(tok: Tokenizer | str) -> str:
    """A stable sha256 of a tokenizer (or its JSON string), independent of key order and whitespace."""
    s = tok if isinstance(tok, str) else to_json(tok)
    canonical = json.dumps(json.loads(s), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` file."""
    path = Path(path)
    try:
        s = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    try:
        return from_json(s)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


def save(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tokenizer.json` atomically (temporary file in the same folder, then rename)."""
    atomic_write(path, to_json(tok))


def decode(tok: Tokenizer, ids) -> str:
    """Decode ids back to text, keeping special tokens (so EOD markers stay visible)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
