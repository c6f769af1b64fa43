"""Self-describing checkpoints: the format, built in one place, written atomically, read safely.

A checkpoint is one ``torch.save`` file holding a dict, assembled by :func:`build_payload` and nowhere else:

* ``format``          ``{"name": "roformer-checkpoint", "version": 1}``
* ``model_cfg``, ``pos_cfg``, ``data_cfg``, ``train_cfg``   resolved configs as plain dicts (enums as strings)
* ``tokenizer_json``  the tokenizer, serialised (``tokenizers.Tokenizer.from_str`` restores it)
* ``model``           state_dict; ``optimizer``, ``scheduler``, ``scaler`` (fp16 only, else None) states
* ``rng``             python, numpy, torch CPU and CUDA generator states; ``sampler`` the data sampler's state
* ``step``, ``tokens_seen``, ``best_val_loss``, ``wandb_run_id``, ``metrics`` (the step's ``val/loss`` and ``val/ppl``;
  empty in a checkpoint written on an interrupt, which is not validated)
* ``world_size``      the number of ranks that trained it (the global batch is batch_size x world_size x grad_accum)
* ``resume_overrides`` run-defining changes made on purpose at a resume (``trainer.resume_override``), every
  resume's, oldest first: ``[{"step": N, "key": "seed", "from": 0, "to": 1}, ...]``; ``[]`` when there were none
  (absent before this field existed). What may change and what it does: :mod:`roformer.resume`
* ``init_from``       where the weights of a fine-tuned run came from (``trainer.init_from``), kept across its
  resumes: ``{"path": "/abs/run/checkpoints/last.pt", "step": N, "tokens_seen": N, "run_name": ..., "seed": ...}``
  (the source checkpoint's file, counters, logger.name and seed); None for a run trained from scratch (absent
  before this field existed)

``train_cfg`` is the config of the run that wrote the file, so after an override it holds the new value.

A run folder keeps ``checkpoints/last.pt``, ``checkpoints/best.pt`` (lowest validation loss) and the last k
``checkpoints/step_XXXXXX.pt`` (:func:`write_run_checkpoint`); last/best are hard links to a step file where the
filesystem allows.

Files are loaded with ``weights_only=True`` (no arbitrary code runs while unpickling); anything that is not
such a checkpoint, including a truncated file, raises :class:`CheckpointError` with a one-line message.
Checkpoints written before ``model.activation`` existed load as ``gelu_tanh``, the only GELU they knew.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

try:  # numpy >= 2 moved its pickling helpers
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar

from roformer.files import atomic_write, first_line, fsync_dir, to_plain
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig

FORMAT = {"name": "roformer-checkpoint", "version": 1}
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (-> checkpoints/last.pt) or a checkpoints folder (-> last.pt)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / LAST, p / LAST):
            if cand.is_file():
                return cand
        raise CheckpointError(f"{p} is a folder without checkpoints/{LAST}; give a checkpoint file or a run folder")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def _nonfinite(state: Mapping) -> list[str]:
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any point leaves either the old file or the new one, never a partial one. Refuses (with
    :class:`CheckpointError`) to write model weights that are not finite.
    """
    path = Path(path)
    bad = _nonfinite(payload.get("model", {}))
    if bad:
        raise CheckpointError(f"refusing to save {path}: non-finite values in {', '.join(bad[:3])}")
    payload = {"format": dict(FORMAT), **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as e:  # torch.save wraps the OSError of a full disk in a RuntimeError
        cause = _os_cause(e)
        if cause is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause} (errno {cause.errno}); "
                              "any previous checkpoint is intact; free space or choose another hydra.run.dir, "
                              "then resume with trainer.resume=auto") from None


def _os_cause(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or somewhere in its cause/context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (``.<name>.*.tmp``); returns them. Only
    the run's writer (rank 0, at start) calls this, when no write of its own is under way."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` the same checkpoint as ``src`` atomically (hard link where possible, else a copy)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def _safe_globals() -> list:
    # numpy arrays and scalars may appear in the RNG and sampler states
    out: list = [np.ndarray, np.dtype, _reconstruct, scalar]
    out += [type(np.dtype(t)) for t in ("uint8", "uint16", "uint32", "int32", "int64", "uint64", "float32",
                                        "float64", "bool")]
    return out


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (a file, or a run folder for its last.pt)."""
    p = resolve_checkpoint(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which is exactly what would run a malicious payload
        what = ("holds objects other than tensors and plain data (refused unread: unpickling them could run code)"
                if zipfile.is_zipfile(p) else "is not a torch file (random bytes or another format)")
        raise CheckpointError(f"{p} is not a roformer checkpoint: it {what}") from None
    except Exception as e:  # truncated zip, unreadable file, ...: one line, no traceback
        reason = first_line(e)
        if "weights_only" in reason:  # never pass on torch's advice to load it unsafely
            reason = type(e).__name__
        raise CheckpointError(
            f"{p} is not a readable roformer checkpoint (truncated, corrupted or another format): {reason[:200]}"
        ) from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT["name"]:
        raise CheckpointError(f"{p} is not a roformer checkpoint (no '{FORMAT['name']}' format marker)")
    if fmt.get("version", 0) > FORMAT["version"]:
        raise CheckpointError(
            f"{p} has checkpoint format version {fmt.get('version')}, newer than this code's {FORMAT['version']}; "
            "update roformer"
        )
    return ckpt


def configs_from_checkpoint(ckpt: dict) -> tuple[ModelConfig, PosConfig]:
    # checkpoints from before model.activation existed were all trained with the tanh GELU
    return ModelConfig(**{"activation": "gelu_tanh", **ckpt["model_cfg"]}), PosConfig(**ckpt["pos_cfg"])


def model_from_checkpoint(ckpt: dict | str | os.PathLike, map_location="cpu") -> TransformerLM:
    """Rebuild the model from a checkpoint (dict or path) and load its weights, in eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location=map_location)
    model = TransformerLM(*configs_from_checkpoint(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def prune_step_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step_XXXXXX.pt`` files (last/best are separate links)."""
    steps = sorted(folder.glob("step_*.pt"))
    for old in steps[: max(0, len(steps) - keep)]:
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# A training run's checkpoints: the payload, the files of a run folder, where a resume starts


def build_payload(*, train_cfg, tokenizer_json: str, model, optimizer,
                  scheduler, scaler, sampler, rng: dict, step: int, tokens_seen: int, best_val_loss: float,
                  wandb_run_id: str | None, metrics: dict, world_size: int,
                  resume_overrides: list[dict] | None = None, init_from: dict | None = None) -> dict:
    """The checkpoint dict of the module docstring, from a run's config (a dataclass with ``model``, ``pos`` and
    ``data`` fields) and live objects. ``scaler`` is None unless fp16 needs one."""
    return {
        "model_cfg": to_plain(train_cfg.model), "pos_cfg": to_plain(train_cfg.pos),
        "data_cfg": to_plain(train_cfg.data),
        "train_cfg": to_plain(train_cfg), "tokenizer_json": tokenizer_json,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng,
        "sampler": sampler.state_dict(), "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val_loss,
        "wandb_run_id": wandb_run_id, "metrics": metrics, "world_size": world_size,
        "resume_overrides": list(resume_overrides or []), "init_from": init_from,
    }


def write_run_checkpoint(folder: Path, payload: dict, *, keep_last: int, best: bool) -> Path:
    """Write a run's checkpoint: ``step_XXXXXX.pt`` (the newest ``keep_last`` kept) with ``last.pt`` linked to
    it, or ``last.pt`` alone when ``keep_last`` is 0; ``best.pt`` becomes this one when ``best``. Returns last.pt.
    """
    last = folder / LAST
    if keep_last > 0:
        written = save_checkpoint(folder / f"step_{payload['step']:06d}.pt", payload)
        link_checkpoint(written, last)
        prune_step_checkpoints(folder, keep_last)
    else:
        save_checkpoint(last, payload)
    if best:
        link_checkpoint(last, folder / BEST)
    return last


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: none for "", this run's last.pt for "auto" (if any), else the path."""
    if not resume:
        return None
    if resume == "auto":
        p = run_dir / "checkpoints" / LAST
        return p if p.exists() else None
    return resolve_checkpoint(resume)
