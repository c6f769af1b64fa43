"""Sample text from a trained checkpoint, streamed to stdout as it is made; tokens/s to stderr.

    python scripts/generate.py ckpt=outputs/2026-01-01/12-00-00 prompt="The history of" max_new_tokens=200
    python scripts/generate.py ckpt=RUN/checkpoints/best.pt prompt_file=prompt.txt temperature=0.8 top_k=50 top_p=0.95
    python scripts/generate.py ckpt=RUN prompt="..." num_samples=3 seed=0         # samples use seeds 0, 1, 2
    python scripts/generate.py ckpt=RUN prompt="..." temperature=0                 # greedy
    python scripts/generate.py ckpt=RUN max_new_tokens=2000 pos.scaling=yarn pos.scaling_factor=8   # past the
                                                     # training length with a RoPE extension (pos.original_len:
                                                     # the checkpoint's training length unless given)
    python scripts/generate.py ckpt=RUN device=cuda prompt="..."                  # CUDA: a static KV cache and a
                                                     # CUDA graph per token (decode=auto); decode=compile compiles
                                                     # the step instead, decode=eager keeps decode_step

Uses the KV cache (one forward per new token) and stops at the end-of-document token or max_new_tokens. An empty
prompt starts a new document. Bad settings exit 2 and an unusable checkpoint exits 1, with one line on stderr;
nothing is written. Settings: configs/generate.yaml; sampling: roformer/generation.py. ``decode``: auto | eager |
static | graph | compile | compile-graph, as roformer/generation.py describes; a path that cannot serve the
checkpoint falls back with a logged reason.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from roformer.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402
from roformer.data import tokenizer as toklib  # noqa: E402
from roformer.eval_run import find_checkpoints  # noqa: E402
from roformer.generation import (  # noqa: E402
    DECODES,
    GenerationError,
    SamplingConfig,
    check_length,
    generate,
    stream_text,
)
from roformer.positional import RopeScaling  # noqa: E402
from roformer.runtime import Device, resolve_device  # noqa: E402


@dataclass
class ScalingConfig:
    """RoPE zero-shot context extension while generating (as ``pos.*`` in training and evaluation)."""

    scaling: RopeScaling = RopeScaling.none
    scaling_factor: float = 1.0
    # the length the extension starts from; 0: the checkpoint's training length
    original_len: int = 0


@dataclass
class GenerateConfig(SamplingConfig):
    ckpt: str | None = None
    which: str = "last"
    prompt: str = ""
    prompt_file: str | None = None
    device: Device = Device.cpu
    # CPU threads (0: torch's default)
    threads: int = 1
    pos: ScalingConfig = field(default_factory=ScalingConfig)
    # how each token's forward runs: auto (CUDA: a static cache replayed as a CUDA graph; CPU: decode_step) |
    # eager | static | graph | compile
    decode: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode not in DECODES:
            raise GenerationError(f"decode={self.decode!r} must be one of {list(DECODES)}")
        if self.which not in ("last", "best"):
            raise GenerationError(f"which={self.which!r} must be last or best")
        if self.pos.scaling_factor < 1.0:
            raise GenerationError(f"pos.scaling_factor={self.pos.scaling_factor} must be >= 1 (1: no scaling)")
        if self.pos.original_len < 0:
            raise GenerationError(f"pos.original_len={self.pos.original_len} must be >= 0 (0: the training length)")
        if self.threads < 0:
            raise GenerationError(f"threads={self.threads} must be >= 0 (0: torch's default)")
        if self.prompt and self.prompt_file:
            raise GenerationError("give prompt= or prompt_file=, not both")


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def settings(cfg: DictConfig) -> GenerateConfig:
    """Type-checked settings; a wrong type or value is a GenerationError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(GenerateConfig), cfg)
        return OmegaConf.to_object(merged)
    except GenerationError:
        raise
    except Exception as e:  # OmegaConf's validation errors: the key, then the first line of the reason
        key = getattr(e, "full_key", "") or ""
        raise GenerationError(f"{key + ': ' if key else ''}{str(e).strip().splitlines()[0]}") from None


def load(s: GenerateConfig):
    """The model (eval mode), its tokenizer, the end-of-document id and the training length."""
    if not s.ckpt:
        raise CheckpointError("no checkpoint given: pass ckpt=RUN_FOLDER or ckpt=FILE.pt")
    paths = find_checkpoints(s.ckpt, s.which)
    if len(paths) != 1:
        raise CheckpointError(f"ckpt={s.ckpt} holds {len(paths)} runs; give one run folder or checkpoint file")
    ckpt = load_checkpoint(paths[0])
    try:
        model = model_from_checkpoint(ckpt).to(resolve_device(s.device, "device"))
        tok = toklib.from_json(ckpt["tokenizer_json"])
        train_len = int(ckpt["train_cfg"]["trainer"]["seq_len"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{paths[0]} is not a usable roformer checkpoint: {type(e).__name__}: {e}") from None
    return model, tok, toklib.ensure_eod(tok), train_len


def run(s: GenerateConfig) -> None:
    if s.threads:
        torch.set_num_threads(s.threads)
    model, tok, eod, train_len = load(s)
    if s.prompt_file:
        try:
            text = Path(s.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(
                f"prompt_file={s.prompt_file} cannot be read ({type(e).__name__}); give a UTF-8 text file"
            ) from None
    else:
        text = s.prompt
    prompt = tok.encode(text).ids if text else [eod]
    if not prompt:
        prompt = [eod]
    check_length(model, len(prompt), s.max_new_tokens)
    p = s.pos
    original_len = p.original_len or train_len
    out = sys.stdout
    n_new, seconds = 0, 0.0
    with model.scaled_positions(p.scaling, p.scaling_factor, original_len):
        for i in range(s.num_samples):
            if s.num_samples > 1:
                out.write(f"{'' if i == 0 else chr(10)}=== sample {i + 1}/{s.num_samples} (seed {s.seed + i}) ===\n")
            if text:
                out.write(text)
            out.flush()
            g = torch.Generator(device=model.wte.weight.device).manual_seed(s.seed + i)
            ids = generate(model, prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, generator=g, stop_id=eod, decode=s.decode)
            counted = _count(ids)
            t0 = time.perf_counter()
            for piece in stream_text(lambda seen: toklib.decode(tok, seen), counted):
                out.write(piece)
                out.flush()
            seconds += time.perf_counter() - t0
            n_new += counted.n
            out.write("\n")
            out.flush()
    rate = n_new / seconds if seconds > 0 else float("inf")
    print(f"{n_new} new tokens in {seconds:.2f} s: {rate:.1f} tokens/s ({len(prompt)}-token prompt, "
          f"{s.num_samples} sample(s), prompt forward included)", file=sys.stderr)


class _count:
    """Pass ids through, counting them."""

    def __init__(self, ids):
        self.ids, self.n = ids, 0

    def __iter__(self):
        for i in self.ids:
            self.n += 1
            yield i


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        s = settings(cfg)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        run(s)
    except CheckpointError as e:  # missing, foreign or unreadable checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # settings that cannot work with this checkpoint (learned table, scaling on ALiBi)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
