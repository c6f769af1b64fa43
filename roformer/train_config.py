"""What train.py runs: the trainer node of configs/train.yaml, and the whole run's ``TrainConfig``.

The schemas of the other nodes live beside their code (``ModelConfig`` in model.py, ``PosConfig`` in positional.py,
``DataConfig`` in data/config.py, ``LoggerConfig`` in logger.py, ``OptimConfig`` in optim.py); :mod:`roformer.config`
composes them for Hydra and :mod:`roformer.training` reads them. Cross-field rules run in ``__post_init__``, before
any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from roformer import checkpoint as ckpt_lib
from roformer.data.config import DataConfig
from roformer.logger import LoggerConfig
from roformer.model import ModelConfig, check_positional
from roformer.optim import OptimConfig
from roformer.positional import PosConfig
from roformer.resume import check_override_keys
from roformer.runtime import COMPILE_SCOPES, Device, Precision


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
    # where it gained nothing measurable; see runtime.resolve_compile)
    compile: str = "auto"
    # what torch.compile covers: model (one graph), blocks (one block's graph reused by every block, and the head
    # apart: a fraction of the compile time), or auto (each device's measured choice; see runtime.compile_model)
    compile_scope: str = "auto"
    device: Device = Device.auto
    # deterministic algorithms (bit-exact repeat and resume on CPU); on CUDA this also needs
    # CUBLAS_WORKSPACE_CONFIG=:4096:8 and may be slower
    deterministic: bool = True
    # "" starts fresh; "auto" continues <run_dir>/checkpoints/last.pt if it exists; else a checkpoint file
    # or a run folder to continue from
    resume: str = ""
    # run-defining keys (seed, model.*, pos.*, data.*, seq_len, batch, optim.*) a resume may change on purpose;
    # see resume.py
    resume_override: list[str] = field(default_factory=list)
    # fine-tune: a fresh run (new optimizer, schedule from step 0) starting from the weights of this checkpoint file
    # or run folder (its checkpoints/last.pt). Same architecture and tokenizer; pos.scaling, pos.scaling_factor,
    # pos.original_len and trainer.seq_len may differ (RoPE context extension). A checkpoint to resume wins.
    init_from: str = ""
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
        if self.compile_scope not in ("auto", *COMPILE_SCOPES):
            raise ValueError(f"trainer.compile_scope={self.compile_scope!r} must be auto, "
                             f"{' or '.join(COMPILE_SCOPES)}")  # fmt: skip
        if self.precision == Precision.fp16 and self.device == Device.cpu:
            raise ValueError("trainer.precision=fp16 needs CUDA (a GradScaler); on CPU use bf16 or fp32")
        if self.resume not in ("", "auto") and not Path(self.resume).exists():
            raise ValueError(
                f"trainer.resume={self.resume}: no such checkpoint file or run folder; "
                "give an existing path, 'auto' (continue this run folder if possible) or '' (start fresh)"
            )
        check_override_keys(self.resume_override)
        self._check_init_from()

    def _check_init_from(self) -> None:
        if not self.init_from:
            return
        try:
            ckpt_lib.resolve_checkpoint(self.init_from)
        except ckpt_lib.CheckpointError:
            what = "a folder without checkpoints/last.pt" if Path(self.init_from).is_dir() else "no such file or folder"
            raise ValueError(
                f"trainer.init_from={self.init_from}: {what}; give the checkpoint file or run folder of the model to "
                "fine-tune, or '' to start from random weights"
            ) from None


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
        self.pos.check_options()  # an option the scheme does not read would do nothing: refused
        check_positional(self.model, self.pos)  # e.g. RoPE's rotary dimension: before any data work
        table = self.pos.max_positions  # None: the scheme has no limit
        if table is not None and self.trainer.seq_len > table:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} is beyond the {self.pos.name} position table "
                f"(pos.max_len={table}); raise pos.max_len or shorten trainer.seq_len"
            )
        data_vocab = getattr(self.data, "vocab_size", None)
        if data_vocab is not None and self.model.vocab_size < data_vocab:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is smaller than data.vocab_size={data_vocab}; "
                "set data.vocab_size only (the model takes its vocabulary from the tokenizer)"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
