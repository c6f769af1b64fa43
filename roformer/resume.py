"""What a resumed run may change, checked before any work, and what it carries over.

A run is defined by its seed, its model (``model.*``), its positional scheme (``pos.name`` and the ``pos.*`` options
the scheme reads: a checkpoint keeps every ``pos.*`` key, and those its scheme never read are not compared), its
tokens (the ``data.*`` settings that change them, and the tokenizer), its batches (``trainer.seq_len``, and the
global batch ``batch_size x world_size x grad_accum`` as the sampler draws it: ``batch_size x world_size`` windows at
a time, ``grad_accum`` times a step) and its optimisation (``optim.*``: the optimizer's and the schedule's state come
from the checkpoint, so another value would otherwise be silently ignored). A resume with another value of any of
these is refused in one line that names the key, the checkpoint's value, this run's value and the fix, unless
``trainer.resume_override=[key,...]`` names the key: then the change is logged (train.log) and recorded in every
later checkpoint (``resume_overrides``). Another number of processes with the same ``batch_size x world_size`` draws
the same windows: that resume stays exact and needs no override.

No override can change what the checkpoint's weights or optimizer state would not fit (``model.d_model``,
``model.n_layer``, a learned table's ``pos.max_len``, ...: both models are built on the meta device and their
parameter shapes compared), nor the tokenizer (the embedding has one row per token).

What an override does from the resumed step on:

* ``seed``: the randomness of a fresh run with the new seed (data order, dropout), not the checkpoint's streams;
* ``trainer.seq_len``, ``trainer.batch_size``, ``trainer.grad_accum``, ``data.*``: the sampler continues its random
  stream with the new window length, batch or corpus;
* ``model.*``, ``pos.*`` that keep the parameter shapes (``model.dropout``, ``model.activation``, ``pos.base``,
  ``pos.name`` between schemes without parameters, ...): the weights load into the new model;
* ``optim.*``: the new value on the loaded optimizer and schedule (AdamW's moments are kept), the schedule
  recomputed at the resumed step: a new ``optim.lr`` scales the rest of the schedule, a new ``optim.warmup_steps``
  or ``optim.schedule`` moves the resumed step to where the new schedule has it.

``trainer.max_steps`` is free: a longer run extends the schedule's decay to the new end.

Rank 0 then claims the run folder (:func:`claim_run_dir`): leftovers of killed writes go, and ``metrics.jsonl`` is
cut back to the resumed step, so a resumed run logs each step once. A refused resume has written nothing.

Fine-tuning (``trainer.init_from``) is not a resume: a fresh run (new optimizer, schedule from step 0, counters at 0)
whose model starts from another checkpoint's weights (:func:`read_init_from`). Those fit only the same architecture
and tokenizer: any other ``model.*`` or ``pos.*`` value is refused in one line naming the key, except what the
weights do not depend on (:data:`INIT_FREE`: dropout, how attention is chunked, the initialisation) and, for a scheme
with a context extension (RoPE), the extension's keys (:data:`EXTENSION_KEYS`: ``pos.scaling`` and its settings, and
``pos.base``, which ABF raises), which with a longer ``trainer.seq_len`` are what such a fine-tune is for. A run
folder with a checkpoint to resume resumes it instead (``init_from`` is then ignored: an interrupted fine-tune
continues exactly), and ``trainer.init_from`` is not a run-defining key.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from roformer import checkpoint as ckpt_lib
from roformer.data.config import DataConfig
from roformer.files import one_line, to_plain
from roformer.logger import cut_metrics
from roformer.model import ModelConfig, TransformerLM
from roformer.optim import OptimConfig
from roformer.positional import SCHEMES, PosConfig
from roformer.runtime import set_rng_state
from roformer.signals import requeue_resume

log = logging.getLogger(__name__)

# data.* settings that do not change the tokens (where files are kept, how fast they are read): free to change
DATA_NOT_TOKENS = ("cache_dir", "num_proc", "hf_cache_dir", "hub_timeout", "wait_timeout", "source")
# trainer.* settings that shape the batches the sampler draws
BATCH_KEYS = ("trainer.seq_len", "trainer.batch_size", "trainer.grad_accum")


def run_keys() -> list[str]:
    """Every key that defines a run, as ``trainer.resume_override`` names them (model.vocab_size is the
    tokenizer's)."""
    model = [f"model.{f.name}" for f in fields(ModelConfig) if f.name != "vocab_size"]
    data = [f"data.{f.name}" for f in fields(DataConfig) if f.name not in DATA_NOT_TOKENS]
    optim = [f"optim.{f.name}" for f in fields(OptimConfig)]
    return ["seed", *model, *[f"pos.{f.name}" for f in fields(PosConfig)], *data, *BATCH_KEYS, *optim]


def check_override_keys(keys: list[str]) -> None:
    """Refuse a ``trainer.resume_override`` entry that is not a run-defining key (one line)."""
    allowed = set(run_keys())
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise ValueError(
            f"trainer.resume_override names {', '.join(bad)}, which {'is' if len(bad) == 1 else 'are'} not among the "
            f"settings that define a run (seed, model.* but vocab_size, pos.*, data.* but {', '.join(DATA_NOT_TOKENS)},"
            f" {', '.join(BATCH_KEYS)}, optim.*); any other setting may change on resume without an override")


def hydra_value(value) -> str:
    """``value`` as a command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Change:
    """One run-defining setting that differs between the checkpoint and this run."""

    key: str
    saved: object  # the checkpoint's value
    current: object  # this run's value
    fix: str  # the override that gives this run the checkpoint's setting back
    fixed: str = ""  # why no override can make this change; "" when one can
    shown: tuple[str, str] | None = None  # "name=value" of the checkpoint and of this run, when not key=value

    def describe(self) -> str:
        saved, current = self.shown or (f"{self.key}={hydra_value(self.saved)}", hydra_value(self.current))
        return f"{saved} in the checkpoint, {current} in this run" + (f" ({self.fixed})" if self.fixed else "")

    def record(self, step: int) -> dict:
        return {"step": step, "key": self.key, "from": self.saved, "to": self.current}


def _batch_change(saved_t: dict, saved_world: int, t, world: int) -> Change | None:
    """trainer.batch_size, compared as the sampler draws it: batch_size x world_size windows at a time."""
    b0, b = saved_t["batch_size"], t.batch_size
    if b0 * saved_world == b * world:
        return None
    if saved_world == world:
        return Change("trainer.batch_size", b0, b, f"trainer.batch_size={b0}")
    fix = (f"trainer.batch_size={b0 * saved_world // world}" if b0 * saved_world % world == 0
           else f"trainer.batch_size={b0} on {saved_world} process{'es' if saved_world > 1 else ''}")
    shown = (f"trainer.batch_size x processes={b0} x {saved_world}", f"{b} x {world}")
    return Change("trainer.batch_size", b0, b, fix, shown=shown)


def _differs(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return not math.isclose(a, b)
    return a != b


def _group_changes(group: str, saved: dict, current: dict, skip: tuple[str, ...] = ()) -> list[Change]:
    return [Change(f"{group}.{k}", saved.get(k), v, f"{group}.{k}={hydra_value(saved.get(k))}")
            for k, v in current.items() if k not in skip and _differs(saved.get(k), v)]


def _pos_compared(saved: dict, current: PosConfig) -> tuple[dict, dict]:
    """The checkpoint's and this run's ``pos.*`` as compared: ``name``, and the options both schemes read (one
    scheme: every option it reads). An option a scheme does not read did nothing, whatever its value."""
    keys = SCHEMES[saved["name"]].options & SCHEMES[current.name].options
    plain = to_plain(current)
    return ({k: v for k, v in saved.items() if k == "name" or k in keys},
            {k: v for k, v in plain.items() if k == "name" or k in keys})


def run_changes(ckpt: dict, cfg, world_size: int) -> list[Change]:
    """Every run-defining difference between a checkpoint and this run's config (a TrainConfig) on ``world_size``
    processes, in the order seed, model, pos, data, trainer, optim; shape-changing ones carry why no override
    helps."""
    saved_model, saved_pos = (to_plain(c) for c in ckpt_lib.configs_from_checkpoint(ckpt))
    saved_t, t = ckpt["train_cfg"]["trainer"], cfg.trainer
    out = []
    if ckpt["train_cfg"]["seed"] != cfg.seed:
        out.append(Change("seed", ckpt["train_cfg"]["seed"], cfg.seed, f"seed={ckpt['train_cfg']['seed']}"))
    shape = (_group_changes("model", saved_model, to_plain(cfg.model), skip=("vocab_size",))
             + _group_changes("pos", *_pos_compared(saved_pos, cfg.pos)))
    out += _mark_unloadable(shape, saved_model, saved_pos)
    out += _group_changes("data", {**to_plain(DataConfig()), **ckpt["data_cfg"]}, to_plain(cfg.data), DATA_NOT_TOKENS)
    if saved_t["seq_len"] != t.seq_len:
        out.append(Change("trainer.seq_len", saved_t["seq_len"], t.seq_len, f"trainer.seq_len={saved_t['seq_len']}"))
    batch = _batch_change(saved_t, ckpt.get("world_size", 1), t, world_size)
    out += [batch] if batch else []
    if saved_t["grad_accum"] != t.grad_accum:
        out.append(Change("trainer.grad_accum", saved_t["grad_accum"], t.grad_accum,
                          f"trainer.grad_accum={saved_t['grad_accum']}"))
    optim = to_plain(cfg.optim)
    return out + _group_changes("optim", ckpt["train_cfg"].get("optim") or optim, optim)


def _layout(model: dict, pos: dict) -> tuple[dict, list] | None:
    """The shapes the weights and the optimizer's state must fit (state_dict entries; parameters in order, as the
    optimizer numbers them), from a model built on the meta device; None for a combination that is no model."""
    read = SCHEMES[pos["name"]].options if pos.get("name") in SCHEMES else set()
    pos = {k: v for k, v in pos.items() if k == "name" or k in read}  # the others shape nothing: their defaults
    try:
        with torch.device("meta"):
            m = TransformerLM(ModelConfig(**model), PosConfig(**pos))
    except ValueError:
        return None
    return ({k: list(v.shape) for k, v in m.state_dict().items()},
            [(n, list(p.shape)) for n, p in m.named_parameters()])


def _why_unloadable(saved: tuple[dict, list], other: tuple[dict, list] | None) -> str:
    if other is None:
        return "no override can change it: with the checkpoint's other settings it is no valid model"
    for name in sorted(saved[0].keys() | other[0].keys()):
        a, b = saved[0].get(name), other[0].get(name)
        if a != b:
            return (f"no override can change it: {name} is {a or 'absent'} in the checkpoint, {b or 'absent'} in "
                    "this run, so the weights would not load")
    return ("no override can change it: the parameters would be tied or split otherwise, so the optimizer's state "
            "would not load")


def _mark_unloadable(changes: list[Change], saved_model: dict, saved_pos: dict) -> list[Change]:
    """``changes`` (model.*, pos.*), those the checkpoint's weights or optimizer state would not fit marked."""
    if not changes:
        return changes
    saved = _layout(saved_model, saved_pos)
    new_model = {**saved_model, **{c.key[6:]: c.current for c in changes if c.key.startswith("model.")}}
    new_pos = {**saved_pos, **{c.key[4:]: c.current for c in changes if c.key.startswith("pos.")}}
    if _layout(new_model, new_pos) == saved:
        return changes
    out = []
    for c in changes:  # which of them changes the shapes on its own
        group, _, name = c.key.partition(".")
        one = _layout({**saved_model, name: c.current} if group == "model" else saved_model,
                      {**saved_pos, name: c.current} if group == "pos" else saved_pos)
        out.append(c if one == saved else replace(c, fixed=_why_unloadable(saved, one)))
    if not any(c.fixed for c in out):  # only together: none can change
        why = "no override can change it: together with the others it changes the shapes of the weights"
        out = [replace(c, fixed=why) for c in changes]
    return out


def refusal(path: Path, refused: list[Change]) -> str:
    """The one line that refuses a resume: what differs, then what to do."""
    fixed, free = [c for c in refused if c.fixed], [c for c in refused if not c.fixed]
    todo = []
    if fixed:
        todo.append(f"use {' '.join(c.fix for c in fixed)}" + ("" if free else ", or train a new model in another "
                                                                    "run folder"))
    if free:
        it = "it" if len(free) == 1 else "them"
        todo.append(f"{'and ' if fixed else 'use '}{' '.join(c.fix for c in free)}, or "
                    f"trainer.resume_override=[{','.join(c.key for c in free)}] to change {it} on purpose")
    return f"cannot resume from {path}: {'; '.join(c.describe() for c in refused)}; {'; '.join(todo)}"


def check_run(ckpt: dict, cfg, world_size: int, path: Path) -> list[Change]:
    """The changes ``trainer.resume_override`` accepts; raises ValueError (:func:`refusal`) for any other."""
    changes = run_changes(ckpt, cfg, world_size)
    named = set(cfg.trainer.resume_override)
    refused = [c for c in changes if c.fixed or c.key not in named]
    if refused:
        raise ValueError(refusal(path, refused))
    return changes


def tokenizer_mismatch(state: dict, vocab_size: int, tokenizer_json: str) -> str:
    """How a checkpoint's tokenizer differs from this run's data's; "" when it is the same."""
    saved = state["model_cfg"]["vocab_size"]
    if saved == vocab_size and state["tokenizer_json"] == tokenizer_json:
        return ""
    return f"its tokenizer is not this run's data's (vocab {saved} in the checkpoint, {vocab_size} in this run)"


@dataclass
class Resume:
    """A checkpoint this run continues, and the run-defining changes its trainer.resume_override accepted."""

    state: dict
    path: Path
    changes: list[Change]

    @property
    def keys(self) -> set[str]:
        return {c.key for c in self.changes}

    @property
    def reseeded(self) -> bool:
        """seed overridden: this run keeps the fresh randomness its own seed made, not the checkpoint's."""
        return "seed" in self.keys

    @property
    def overrides(self) -> list[dict]:
        """Every resume's accepted changes, this one's last (the checkpoint's ``resume_overrides``)."""
        return [*self.state.get("resume_overrides", []), *(c.record(self.state["step"]) for c in self.changes)]

    def check_tokenizer(self, vocab_size: int, tokenizer_json: str) -> None:
        """Refuse a checkpoint whose tokenizer is not this run's data's (no override can: a row per token)."""
        why = tokenizer_mismatch(self.state, vocab_size, tokenizer_json)
        if why:
            raise ValueError(f"cannot resume from {self.path}: {why}; no override can change it (the weights hold a "
                             "row per token): use the checkpoint's data.* settings")

    def load_into(self, tr) -> None:
        """The checkpoint's states into a training.Trainee: model, optimizer, schedule, scaler, then the sampler and
        every RNG, except after an overridden seed (the fresh ones of this run's seed stay)."""
        state = self.state
        tr.raw.load_state_dict(state["model"])
        tr.opt.load_state_dict(state["optimizer"])
        tr.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            tr.scaler.load_state_dict(state["scaler"])
        if self.reseeded:
            tr.sampler.step = state["sampler"]["step"]
        else:
            tr.sampler.load_state_dict(self.sampler_state(tr.sampler))
            set_rng_state(state["rng"])

    def sampler_state(self, sampler) -> dict:
        """The sampler state to load: the checkpoint's, or, after an overridden batch, length or corpus, its random
        stream in this run's shape."""
        saved = self.state["sampler"]
        if self.keys & set(BATCH_KEYS) or any(k.startswith("data.") for k in self.keys):
            return {**saved, "seq_len": sampler.seq_len, "global_batch": sampler.global_batch,
                    "n_starts": sampler.n_starts}
        if saved["n_starts"] != sampler.n_starts:
            raise ValueError(
                f"cannot resume from {self.path}: this run's training split has {sampler.n_starts + sampler.seq_len:,} "
                f"tokens, the checkpoint's had {saved['n_starts'] + saved['seq_len']:,}: the corpus changed though no "
                "data.* setting did; use the checkpoint's corpus")
        return saved

    def announce(self) -> None:
        for c in self.changes:
            log.warning("trainer.resume_override: %s changes from %s (checkpoint) to %s at step %d", c.key,
                        hydra_value(c.saved), hydra_value(c.current), self.state["step"])


def read_resume(cfg, run_dir: Path, world_size: int) -> Resume | None:
    """The checkpoint trainer.resume names (a requeued SLURM job: its own last.pt), read and checked against this
    run (a TrainConfig on ``world_size`` processes) before any work; None for a fresh start."""
    resume = requeue_resume(cfg.trainer.resume, ckpt_lib.resume_path("auto", run_dir))
    path = ckpt_lib.resume_path(resume, run_dir)
    if path is None:
        if resume == "auto":
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
        return None
    state = ckpt_lib.load_checkpoint(path)
    return Resume(state, path, check_run(state, cfg, world_size, path))


def claim_run_dir(run_dir: Path, resumed_step: int | None) -> None:
    """Rank 0, once every check has passed and before the first write: remove the temporary files of killed writes
    (checkpoints, metrics) and, on a resume, cut metrics.jsonl back to the resumed step."""
    stale = ckpt_lib.remove_stale_temps(run_dir / "checkpoints") + ckpt_lib.remove_stale_temps(run_dir)
    if stale:
        log.info("removed %d leftover file(s) of killed writes: %s", len(stale), ", ".join(p.name for p in stale))
    if resumed_step is not None:
        dropped = cut_metrics(run_dir, resumed_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d row(s) logged after step %d (they are logged again)", dropped,
                     resumed_step)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning: a fresh run from another checkpoint's weights (trainer.init_from)

# model.* keys a fine-tune may change: what the weights do not depend on (vocab_size is the tokenizer's, checked on
# its own)
INIT_FREE = ("model.vocab_size", "model.dropout", "model.bias_block", "model.bias_kernel", "model.linear_chunk",
             "model.init_std")
# pos.* keys a fine-tune of a scheme with a context extension (supports_scaling: RoPE) may change, the point of
# fine-tuning at a longer trainer.seq_len: the scaling and its settings, and the base (ABF, Xiong et al. 2023)
EXTENSION_KEYS = ("pos.base", "pos.scaling", "pos.scaling_factor", "pos.original_len", "pos.low_freq_factor",
                  "pos.high_freq_factor")


def architecture_change(ckpt: dict, cfg) -> Change | None:
    """The first ``model.*`` or ``pos.*`` key where ``ckpt`` and this run (a TrainConfig) differ, outside
    :data:`INIT_FREE` and, for a scheme with a context extension, :data:`EXTENSION_KEYS`; None when its weights are
    this run's model's."""
    saved_model, saved_pos = (to_plain(c) for c in ckpt_lib.configs_from_checkpoint(ckpt))
    changes = (_group_changes("model", saved_model, to_plain(cfg.model))
               + _group_changes("pos", *_pos_compared(saved_pos, cfg.pos)))
    free = INIT_FREE + (EXTENSION_KEYS if SCHEMES[saved_pos["name"]].supports_scaling else ())
    return next((c for c in changes if c.key not in free), None)


@dataclass
class InitFrom:
    """The checkpoint whose weights a fresh run starts from (``trainer.init_from``), its architecture checked."""

    state: dict
    path: Path  # the checkpoint file, absolute

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def provenance(self) -> dict:
        """Where the weights came from, as every checkpoint of the fine-tuned run records it (``init_from``)."""
        train_cfg = self.state.get("train_cfg", {})
        return {"path": str(self.path), "step": self.state["step"], "tokens_seen": self.state["tokens_seen"],
                "run_name": train_cfg.get("logger", {}).get("name"), "seed": train_cfg.get("seed")}

    def check_tokenizer(self, vocab_size: int, tokenizer_json: str) -> None:
        """Refuse weights trained with another tokenizer than this run's data's (the embedding: a row per token)."""
        why = tokenizer_mismatch(self.state, vocab_size, tokenizer_json)
        if why:
            raise ValueError(f"cannot initialise from {self.path} (trainer.init_from): {why}; its weights hold a row "
                             "per token: use the checkpoint's data.* settings")

    def load_into(self, model: TransformerLM) -> None:
        """The checkpoint's weights into this run's bare model (before any compile or DDP wrap)."""
        model.load_state_dict(self.state["model"])


def read_init_from(cfg) -> InitFrom:
    """The checkpoint ``cfg.trainer.init_from`` names (a file, or a run folder's checkpoints/last.pt), read with
    weights_only and checked against this run's architecture (a TrainConfig) before any work: ValueError in one line
    for a file that is no roformer checkpoint or a model it does not fit."""
    try:
        path = Path(os.path.abspath(ckpt_lib.resolve_checkpoint(cfg.trainer.init_from)))
        state = ckpt_lib.load_checkpoint(path)
    except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(f"trainer.init_from: {one_line(e)}") from None
    change = architecture_change(state, cfg)
    if change is not None:
        raise ValueError(f"cannot initialise from {path} (trainer.init_from): {change.describe()}; its weights fit "
                         f"only the same architecture: use {change.fix}, or trainer.init_from='' to train this "
                         "model from scratch")
    return InitFrom(state, path)
