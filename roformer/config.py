"""The structured-config schema of a training run, registered with Hydra's ConfigStore.

Validation happens in two layers (STYLE.md, lesson 6). Types and allowed values come from these dataclasses:
Hydra rejects an unknown key, a wrong type or a value outside an Enum while composing, before any work. Rules
that span fields live in ``__post_init__`` and run when :func:`to_config` turns the composed ``DictConfig``
into plain dataclasses, once, at the entry point.

``configs/train.yaml`` lists ``train_schema`` first in its defaults, so every group option (``model/``,
``pos/``, ``data/``, ``optim/``, ``logger/``, ...) is merged into this typed tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from roformer.data import DataConfig
from roformer.evaluation import EvalSettings
from roformer.model import ModelConfig
from roformer.positional import PosConfig


class Precision(str, Enum):
    """Arithmetic of the forward/backward pass. Weights and optimizer state are always fp32."""

    # bf16 on CUDA when supported (else fp16); bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (CPU and CUDA)
    fp16 = "fp16"  # autocast to float16 with a GradScaler (CUDA only)


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Schedule(str, Enum):
    cosine = "cosine"  # linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
    constant = "constant"  # linear warmup, then constant


class LoggerKind(str, Enum):
    wandb = "wandb"
    none = "none"  # metrics still go to <run_dir>/metrics.jsonl


class WandbMode(str, Enum):
    auto = "auto"  # online when logged in (WANDB_API_KEY or ~/.netrc), else offline; WANDB_MODE wins if set
    online = "online"
    offline = "offline"  # files under <run_dir>/wandb, upload later with `wandb sync`
    disabled = "disabled"


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on weight matrices only, linear warmup, then a decay schedule."""

    lr: float = 2e-3
    # floor of the cosine decay, as a fraction of lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Schedule = Schedule.cosine
    # applied to the 2-D weights of linear layers and the token embedding (tied to the LM head); never to
    # norms, biases or positional parameters (learned/relative/t5 tables)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be positive (e.g. optim.lr=1e-3)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be positive")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        self.schedule = Schedule(self.schedule)


@dataclass
class TrainerConfig:
    """The loop. The global batch is batch_size x world_size x grad_accum sequences of seq_len tokens."""

    seq_len: int = 256
    # sequences per micro-batch on each rank
    batch_size: int = 16
    # micro-batches accumulated per optimizer step
    grad_accum: int = 1
    max_steps: int = 600
    # validate (and checkpoint) every this many steps and at the end; 0: only at the end
    eval_interval: int = 100
    # validation micro-batches of batch_size fixed windows (evenly spaced over the split); 0: every window
    eval_iters: int = 20
    # log train/* metrics every this many steps
    log_interval: int = 10
    # step checkpoints kept besides last.pt and best.pt (0: none)
    keep_last: int = 2
    precision: Precision = Precision.auto
    # torch.compile the model: true, false, or auto (where it pays off: on CUDA for runs of 300+ steps; not on CPU,
    # where it gained nothing measurable; see training.resolve_compile)
    compile: str = "auto"
    device: Device = Device.auto
    # deterministic algorithms (bit-exact repeat and resume on CPU); on CUDA this also needs
    # CUBLAS_WORKSPACE_CONFIG=:4096:8 and may be slower
    deterministic: bool = True
    # "" starts fresh; "auto" continues <run_dir>/checkpoints/last.pt if it exists; else a checkpoint file
    # or a run folder to continue from
    resume: str = ""
    # tqdm progress bar (rank 0)
    progress: bool = True
    # CPU threads for torch (0: torch's default, every core). On a machine shared with other jobs 1 can be
    # several times faster than 2: each kernel ends in a barrier that waits for a preempted thread
    threads: int = 0

    def __post_init__(self) -> None:
        for key in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be a positive integer")
        for key in ("eval_interval", "eval_iters", "keep_last", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be >= 0")
        self.precision = Precision(self.precision)
        self.device = Device(self.device)
        words = {"true": "true", "on": "true", "false": "false", "off": "false", "auto": "auto"}  # YAML booleans too
        compile_ = words.get(str(self.compile).lower())
        if compile_ is None:
            raise ValueError(f"trainer.compile={self.compile!r} must be auto, true or false")
        self.compile = compile_
        if self.precision == Precision.fp16 and self.device == Device.cpu:
            raise ValueError("trainer.precision=fp16 needs CUDA (a GradScaler); on CPU use bf16 or fp32")
        if self.resume not in ("", "auto") and not Path(self.resume).exists():
            raise ValueError(
                f"trainer.resume={self.resume}: no such checkpoint file or run folder; "
                "give an existing path, 'auto' (continue this run folder if possible) or '' (start fresh)"
            )


@dataclass
class LoggerConfig:
    """Dashboard logging (rank 0 only). wandb failures warn once and never stop training."""

    kind: LoggerKind = LoggerKind.wandb
    project: str = "roformer"
    entity: str | None = None
    # runs of one sweep share a group; None: the sweep folder's name under -m, else no group
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    # None: the sweep job's override string (e.g. "pos=rope,seed=0"), else wandb's generated name
    name: str | None = None
    mode: WandbMode = WandbMode.auto

    def __post_init__(self) -> None:
        self.kind = LoggerKind(self.kind)
        self.mode = WandbMode(self.mode)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pos: PosConfig = field(default_factory=PosConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pos.name == "learned" and self.trainer.seq_len > self.pos.max_len:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} is beyond the learned position table "
                f"(pos.max_len={self.pos.max_len}); raise pos.max_len or shorten trainer.seq_len"
            )
        data_vocab = getattr(self.data, "vocab_size", None)
        if data_vocab is not None and self.model.vocab_size < data_vocab:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is smaller than data.vocab_size={data_vocab}; "
                "set data.vocab_size only (the model takes its vocabulary from the tokenizer)"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


def register_configs() -> None:
    """Make ``train_schema`` available to ``configs/train.yaml``'s defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()


def to_config(cfg: DictConfig) -> TrainConfig:
    """The composed Hydra config -> typed dataclasses (cross-field checks run here). Drops a ``hydra`` node."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError(f"expected a config composed from train_schema, got {type(obj).__name__}")
    return obj


def to_plain(obj) -> object:
    """Dataclasses, enums and paths -> dicts, strings and numbers (for checkpoints and dashboards)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
# Evaluation (evaluate.py, configs/evaluate.yaml)


@dataclass
class EvalConfig:
    """What evaluate.py scores. The scoring settings live in ``eval`` (roformer.evaluation.EvalSettings)."""

    # a checkpoint file, a run folder, a sweep folder, or a list of those
    ckpt: Any = None
    # which checkpoint of a run folder: last or best
    which: str = "last"
    eval: EvalSettings = field(default_factory=EvalSettings)
    # another corpus to score; None: each checkpoint's own corpus (always with the checkpoint's tokenizer)
    data: DataConfig | None = None
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(job_type="eval"))

    def __post_init__(self) -> None:
        if self.ckpt in (None, "", []):
            raise ValueError("ckpt is required: ckpt=RUN_FOLDER, ckpt=FILE.pt, ckpt=[A,B] or ckpt=SWEEP_FOLDER")
        if not isinstance(self.ckpt, str):
            self.ckpt = [str(c) for c in self.ckpt]
        if self.which not in ("last", "best"):
            raise ValueError(f"which={self.which!r} must be last or best")


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def to_eval_config(cfg: DictConfig) -> EvalConfig:
    """The composed evaluate.yaml -> typed dataclasses (checks run here)."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    return OmegaConf.to_object(cfg)
