"""Text generation: pure functions for one sampling step, and :func:`generate`, which streams token ids.

The prompt is run once into a :class:`~roformer.model.KVCache` sized for the whole sequence; every new token is
then one forward of one token. Sampling (temperature, top-k, nucleus top-p; Holtzman et al., 2020) is done with
torch ops on a ``torch.Generator`` seeded per sample, so a seed gives the same text on every run. Temperature 0
is greedy decoding.

How each new token's forward runs is ``decode`` (:data:`DECODES`):

* ``eager``: ``TransformerLM.decode_step`` after the prompt, tuned for a CPU (where it stays the default);
* ``static``: a :class:`~roformer.decoding.StaticDecoder` (static KV cache, fixed-shape step) called as Python;
* ``graph``: the same step captured once as a CUDA graph and replayed per token (CUDA; elsewhere ``static``);
* ``compile``: the step under ``torch.compile(mode="reduce-overhead")`` (a compile, once per model and length);
* ``compile-graph``: the step compiled without CUDA-graph trees, captured in a CUDA graph of our own (CUDA);
* ``auto``: ``graph`` on CUDA, ``eager`` elsewhere.

A model the static step cannot serve (a score-bias scheme, linear attention, dynamic NTK past its original length)
decodes ``eager``; so does one whose graph or compile fails to build, or fails mid-way (then from the tokens made
so far), each with a logged reason. Greedy decoding stays on the device token to token (one host read per token);
sampling takes the step's logits out and draws with :func:`sample_next`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from roformer import decoding
from roformer.model import KVCache, TransformerLM
from roformer.positional import PositionOutOfRange

log = logging.getLogger(__name__)

# generate(decode=...) -> the StaticDecoder run it asks for (None: TransformerLM.decode_step); auto is per device
DECODES = ("auto", "eager", "static", "graph", "compile", "compile-graph")


class GenerationError(ValueError):
    """A generation setting that cannot work (the message names the key, the value and the fix)."""


@dataclass
class SamplingConfig:
    """How each new token is chosen."""

    # upper bound on new tokens; generation also stops at the end-of-document token
    max_new_tokens: int = 200
    # softmax temperature; 0 is greedy (argmax)
    temperature: float = 0.8
    # keep only the k most likely tokens (0: all)
    top_k: int = 50
    # keep the smallest set of tokens whose probability reaches top_p (1: all)
    top_p: float = 0.95
    # samples drawn one after another from the same prompt; sample i uses seed + i
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 is greedy decoding)")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
        if self.num_samples < 1:
            raise GenerationError(f"num_samples={self.num_samples} must be at least 1")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) with every token outside the top-k and outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p; the most likely token
    is always kept, so something can always be sampled.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None
) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def check_length(model: TransformerLM, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse, before any work, a prompt plus new tokens that would pass the scheme's position table."""
    limit = model.pos.max_positions(model.pos.cfg)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise PositionOutOfRange(
            f"prompt ({n_prompt} tokens) + max_new_tokens={max_new_tokens} = {n_prompt + max_new_tokens} positions "
            f"pass the learned position table (size pos.max_len={limit}); use a prompt and max_new_tokens that sum "
            f"to at most {limit}"
        )


def decode_run(decode: str, device: torch.device) -> str | None:
    """The StaticDecoder run that ``decode`` means on ``device``, or None for ``decode_step``."""
    if decode not in DECODES:
        raise GenerationError(f"decode={decode!r} is not a decoding path; choose one of {list(DECODES)}")
    if decode == "auto":
        return "graph" if device.type == "cuda" else None
    if decode == "graph" and device.type != "cuda":
        log.warning("decode=graph needs CUDA (the model is on %s): running the static step as Python", device)
        return "eager"
    if decode == "compile-graph" and device.type != "cuda":
        log.warning("decode=compile-graph needs CUDA (the model is on %s): compiling the step alone", device)
        return "compile"
    return {"eager": None, "static": "eager"}.get(decode, decode)


@torch.inference_mode()
def generate(
    model: TransformerLM,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    decode: str = "auto",
) -> Iterator[int]:
    """Yield new token ids one at a time; drawing ``stop_id`` (the end-of-document token) ends the stream, unyielded.

    ``model`` should be in eval mode; positions start at 0 with the prompt, so a scheme's zero-shot scaling
    (``model.scaled_positions``) applies as the caller sets it, as does autocast. ``decode``: see the module
    docstring; every path gives the same tokens (up to float rounding in the logits).
    """
    if len(prompt) == 0:
        raise GenerationError("the prompt is empty; give at least one token (e.g. the end-of-document token)")
    check_length(model, len(prompt), max_new_tokens)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, stop_id=stop_id)
    run = decode_run(decode, model.wte.weight.device)
    dec = None
    if run is not None:
        dec, why = decoding.decoder_for(model, len(prompt) + max_new_tokens, run)
        if dec is None:  # expected under auto for the schemes the step does not serve; worth a warning if asked
            log.log(logging.INFO if decode == "auto" else logging.WARNING,
                    "decode=%s: decoding with decode_step instead (%s)", decode, why)
    decoding.note_path(model, "decode_step" if dec is None else f"static:{dec.run}")
    if dec is None:
        yield from _generate_cached(model, list(prompt), max_new_tokens, **sampling)
        return
    made: list[int] = []
    try:
        with dec.claimed():
            for t in _generate_static(dec, list(prompt), max_new_tokens, **sampling):
                made.append(t)
                yield t
        return
    except Exception as e:  # a graph or compiled step that fails mid-way: carry on from the tokens made so far
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.warning("static decoding (run=%s) failed after %d tokens (%s); continuing with decode_step",
                    dec.run, len(made), reason)
        decoding.forget(model, dec.run, reason)
        decoding.note_path(model, f"static:{dec.run}, then decode_step after {len(made)} tokens ({reason})")
    yield from _generate_cached(model, list(prompt) + made, max_new_tokens - len(made), **sampling)


def _generate_cached(model, ids: list[int], n: int, *, temperature, top_k, top_p, generator, stop_id):
    """``n`` new tokens after ``ids`` through a KVCache and ``decode_step``."""
    if n <= 0:
        return
    device = model.wte.weight.device
    cache = KVCache(capacity=len(ids) + n)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    for i in range(n):
        tok = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (1, 1)
        t = int(tok)
        if t == stop_id:
            return
        yield t
        if i + 1 < n:
            logits = model.decode_step(tok, cache)  # = model(tok, cache=cache)[0], with less per-token overhead


def _generate_static(dec: decoding.StaticDecoder, ids: list[int], n: int, *, temperature, top_k, top_p, generator,
                     stop_id):
    """``n`` new tokens after ``ids`` through a static decoder: the same draws, in the same order, as
    :func:`_generate_cached`."""
    logits = dec.prefill(torch.tensor([ids], device=dec.device))  # (1, V)
    if temperature == 0:
        for (t,) in dec.greedy(logits.argmax(dim=-1, keepdim=True), n):
            if t == stop_id:
                return
            yield t
        return
    tok = sample_next(logits, temperature, top_k, top_p, generator)  # (1, 1)
    for i in range(n):
        t = int(tok)
        if t == stop_id:
            return
        yield t
        if i + 1 < n:
            logits, _ = dec.step(tok)
            tok = sample_next(logits, temperature, top_k, top_p, generator)


def stream_text(decode, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces to print as ``ids`` arrive: decode the whole list each time and yield the new suffix.

    Decoding tokens one by one would break multi-byte characters split across byte-level BPE tokens; a piece
    ending in an incomplete character (U+FFFD) is held back until the following tokens complete it.
    """
    seen: list[int] = []
    shown = ""
    for i in ids:
        seen.append(i)
        text = decode(seen)
        if text.endswith("\ufffd"):
            continue
        n = len(shown) if text.startswith(shown) else next(
            (j for j, (a, b) in enumerate(zip(text, shown, strict=False)) if a != b), min(len(text), len(shown))
        )
        if len(text) > n:
            yield text[n:]
        shown = text
    if seen:
        text = decode(seen)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]
