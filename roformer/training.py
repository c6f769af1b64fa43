"""The training loop: precision, validation, checkpoints, exact resume and DDP.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of ``seq_len`` tokens on each of
``world_size`` ranks, so the global batch is ``batch_size x world_size x grad_accum`` sequences. DDP averages
gradients over ranks, and the loss of a micro-batch is divided by ``grad_accum``, so one step sees the mean loss
over the global batch whatever its split into ranks and micro-batches (``WindowSampler`` gives the ranks
disjoint slices of one seeded global batch, so the windows are the same too).

Optimiser: AdamW with decoupled weight decay on the 2-D weight matrices (linear layers and the token
embedding, which is tied to the LM head) and none on norms, biases and positional parameters (learned,
relative and T5 tables: decaying them pulls far positions to zero). Linear warmup over ``optim.warmup_steps``,
then cosine decay to ``optim.lr x optim.min_lr_ratio`` at ``trainer.max_steps``; global-norm gradient clipping.

Precision (``trainer.precision=auto``): on CUDA bf16 autocast when the GPU supports it, else fp16 autocast with
a GradScaler; on CPU bf16 autocast when oneDNN reports native bf16 (AVX512-BF16 or AMX, about 1.6x faster than
fp32 on such CPUs), else fp32. Weights, optimizer state, the loss and RoPE's angles stay fp32.

Exact resume: a checkpoint holds model, optimizer, scheduler, GradScaler, sampler and every RNG state, taken
after the step's update; validation consumes no randomness. On CPU with ``trainer.deterministic=true`` a run
resumed at step N is bit for bit the uninterrupted run (tests/test_training.py checks it), and two runs of
one config are identical, in fp32 at any thread count and in bf16 on one thread. Measured on an AVX512-BF16
CPU: bf16 on 2 threads drifts by ~1e-6 in the loss from the second step (oneDNN's multithreaded bf16 kernels
do not reduce in a fixed order); use ``trainer.precision=fp32`` or ``OMP_NUM_THREADS=1`` for bit-exact runs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from roformer import checkpoint as ckpt_lib
from roformer.config import Device, Precision, Schedule, TrainConfig, to_plain
from roformer.data import PreparedData, WindowSampler, prepare
from roformer.logging_utils import make_logger
from roformer.malloc import keep_freed_memory
from roformer.model import TransformerLM

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------
# Runtime: device, ranks, precision


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: fp32
    use_scaler: bool = False  # fp16 on CUDA

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    precision = Precision(precision)
    if precision == Precision.auto:
        if device.type == "cuda":
            precision = Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
        else:
            precision = Precision.bf16 if cpu_has_fast_bf16() else Precision.fp32
    if precision == Precision.fp16 and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA (a GradScaler); on CPU use bf16 or fp32")
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision], (
        precision == Precision.fp16
    )


# trainer.compile=auto: compile on CUDA for runs of at least this many steps (trainer.max_steps, so that a resumed
# run decides as the original did). Compiling takes about a minute there and typically speeds a step up by far
# more than it costs over a few hundred steps. On CPU auto never compiles: at the reference shape it gained
# nothing measurable (1 thread: 1.00x; 2 threads: +7-16% in one run and -15%..+2% in a paired one, with the
# first step ~40-110 s slower; docs/performance.md), and trainer.compile=true is there for whoever measures more.
COMPILE_MIN_STEPS_CUDA = 300


def resolve_compile(setting: str, device: torch.device, steps: int) -> bool:
    """Whether to torch.compile: ``true``/``false`` as given; ``auto``: on CUDA for runs of 300+ steps."""
    if setting != "auto":
        return setting == "true"
    return device.type == "cuda" and steps >= COMPILE_MIN_STEPS_CUDA


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device, join the process group (NCCL on CUDA, gloo
    on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.trainer.device
    if want == Device.cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    use_cuda = want == Device.cuda or (want == Device.auto and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()  # no page faults for the step's large tensors: ~9% faster steps (roformer/malloc.py)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    dtype, scaler = resolve_precision(cfg.trainer.precision, device)
    return Runtime(device, rank, local_rank, world_size, dtype, scaler)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Optimisation


def param_groups(model: TransformerLM, weight_decay: float) -> list[dict]:
    """Decay the 2-D weights of the transformer (linear layers, token embedding/LM head); not norms, biases or
    positional parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("pos.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup: int, max_steps: int, min_ratio: float, schedule: Schedule) -> float:
    """Multiplier of optim.lr for the update after ``step`` completed updates."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == Schedule.constant:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """A picklable lr lambda (its fields go into the scheduler's state_dict)."""

    def __init__(self, warmup: int, max_steps: int, min_ratio: float, schedule: Schedule):
        self.warmup, self.max_steps, self.min_ratio, self.schedule = warmup, max_steps, min_ratio, schedule.value

    def __call__(self, step: int) -> float:
        return lr_factor(step, warmup=self.warmup, max_steps=self.max_steps, min_ratio=self.min_ratio,
                         schedule=Schedule(self.schedule))


def build_optimizer(model: TransformerLM, cfg: TrainConfig, device: torch.device):
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=device.type in ("cuda", "cpu"))  # fused: 4x faster step on CPU too
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRSchedule(o.warmup_steps, cfg.trainer.max_steps, o.min_lr_ratio, o.schedule))
    return opt, sched


# ----------------------------------------------------------------------------------------------------------
# Validation


def unigram_ppl(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of ``val_tokens`` under the add-one smoothed unigram distribution of ``train_tokens``: the
    baseline any model that uses context must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-logp[np.asarray(val_tokens)].mean()))


def eval_starts(n_tokens: int, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets of ``n_windows`` fixed validation windows (of seq_len + 1 tokens), evenly spaced; at most
    every non-overlapping window (n_windows <= 0 means all of them)."""
    n_max = (n_tokens - 1) // seq_len
    if n_max < 1:
        raise ValueError(f"the validation split has {n_tokens} tokens, fewer than trainer.seq_len + 1 = {seq_len + 1}")
    if n_windows <= 0 or n_windows >= n_max:
        return np.arange(n_max) * seq_len
    return np.linspace(0, n_tokens - seq_len - 1, n_windows).round().astype(np.int64)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, starts: np.ndarray, rt: Runtime, batch_size: int, seq_len: int) -> float:
    """Mean next-token loss over the windows at ``starts`` (this rank takes every world_size-th window; the
    sums are all-reduced)."""
    was_training = model.training
    model.eval()
    mine = starts[rt.rank :: rt.world_size]
    nll = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = torch.zeros((), dtype=torch.float64, device=rt.device)
    ar = np.arange(seq_len + 1)
    for i in range(0, len(mine), batch_size):
        w = torch.from_numpy(np.asarray(tokens[mine[i : i + batch_size, None] + ar], dtype=np.int64)).to(rt.device)
        with rt.autocast():
            _, loss = model(w[:, :-1], w[:, 1:], reduction="sum")
        nll += loss.double()
        count += w[:, 1:].numel()
    if rt.distributed:
        dist.all_reduce(nll)
        dist.all_reduce(count)
    model.train(was_training)
    return float(nll / count)


# ----------------------------------------------------------------------------------------------------------
# Resume


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: none for "", this run's last.pt for "auto" (if any), else the path."""
    if not resume:
        return None
    if resume == "auto":
        p = run_dir / "checkpoints" / ckpt_lib.LAST
        return p if p.exists() else None
    return ckpt_lib.resolve_checkpoint(resume)


def check_compatible(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse a checkpoint of another model or positional scheme, naming the differing fields."""
    saved_cfg = to_plain(ckpt_lib.configs_from_checkpoint(ckpt)[0])  # with the defaults of older checkpoints
    saved_model = {k: v for k, v in saved_cfg.items() if k != "vocab_size"}
    cur_model = {k: v for k, v in to_plain(cfg.model).items() if k != "vocab_size"}
    diff = ckpt_lib.config_diff(saved_model, cur_model, "model") + ckpt_lib.config_diff(
        ckpt["pos_cfg"], to_plain(cfg.pos), "pos")
    if diff:
        raise ValueError(f"cannot resume from {path}: it has another shape: {'; '.join(diff)}; "
                         "resume with the same model/pos settings or start a new run")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {folder} cannot be written ({e.strerror or e}); "
                         "choose another with hydra.run.dir=...") from None


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, data: PreparedData | None = None) -> float:
    """Train as ``cfg`` says, writing checkpoints and metrics under ``run_dir`` (rank 0).

    Returns the best validation loss (the objective a Hydra sweeper minimises). ``data`` skips
    :func:`roformer.data.prepare` (tests pass small corpora). Raises ``ValueError`` for bad input before any
    training step and :class:`TrainingDiverged` when the loss stops being finite.
    """
    rt = setup_runtime(cfg)
    if rt.distributed:  # rank 0's folder is the run's (train.py gives other ranks a dummy one)
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    run_dir = Path(run_dir)
    if rt.is_main:
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.WARNING)
    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    if rt.is_main:
        _check_writable(ckpt_dir)

    # resume: read and check the checkpoint before any work
    start_path = resume_path(t.resume, run_dir)
    state = None
    if start_path is not None:
        state = ckpt_lib.load_checkpoint(start_path)
        check_compatible(state, cfg, start_path)
    elif t.resume == "auto":
        log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)

    seed_everything(cfg.seed, t.deterministic)
    if data is None:
        data = prepare(cfg.data, rank=rt.rank, world_size=rt.world_size, progress=t.progress and rt.is_main)
    # the model's vocabulary is the tokenizer's (a small corpus may give fewer merges than data.vocab_size)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = data.vocab_size
    if state is not None:
        if state["model_cfg"]["vocab_size"] != data.vocab_size or state["tokenizer_json"] != data.tokenizer_json:
            raise ValueError(f"cannot resume from {start_path}: its tokenizer differs from this run's data "
                             f"(vocab {state['model_cfg']['vocab_size']} vs {data.vocab_size}); use the same data.* "
                             "settings as the checkpointed run")
    train_tokens, val_tokens = data.splits["train"].tokens, data.splits["validation"].tokens

    model = TransformerLM(cfg.model, cfg.pos).to(rt.device)
    opt, sched = build_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.use_scaler)
    sampler = WindowSampler(train_tokens, t.seq_len, t.batch_size, seed=cfg.seed, rank=rt.rank,
                            world_size=rt.world_size)
    starts = eval_starts(len(val_tokens), t.seq_len, t.eval_iters * t.batch_size * rt.world_size)
    step, tokens_seen, best_val, run_id, last_good = 0, 0, math.inf, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state["best_val_loss"]
        run_id, last_good = state.get("wandb_run_id"), start_path
        set_rng_state(state["rng"])
        # a longer run than the checkpointed one extends the schedule to the new max_steps
        sched.lr_lambdas[0].max_steps = t.max_steps
        log.info("resumed from %s at step %d", start_path, step)
        del state

    raw_model = model
    if resolve_compile(t.compile, rt.device, t.max_steps):
        log.info("torch.compile: on (trainer.compile=%s, %d steps)", t.compile, t.max_steps)
        model = torch.compile(model)
    if rt.distributed:
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * rt.world_size
    n_params = raw_model.num_params()
    plain = to_plain(cfg)
    run_info = {"world_size": rt.world_size, "global_batch": t.batch_size * rt.world_size * t.grad_accum,
                "tokens_per_step": tokens_per_step, "n_params": n_params, "precision_resolved": rt.precision,
                "device_resolved": str(rt.device), "run_dir": str(run_dir)}
    logger = make_logger(cfg.logger, run_dir, {**plain, "run": run_info}, run_id=run_id, rank=rt.rank)
    uni = unigram_ppl(train_tokens, val_tokens, data.vocab_size) if rt.is_main else float("nan")
    log.info("model %s, %.2fM params, pos=%s; %s on %s x%d; global batch %d x %d tokens; unigram val ppl %.1f",
             cfg.model.attention.value, n_params / 1e6, cfg.pos.name, rt.precision, rt.device.type, rt.world_size,
             run_info["global_batch"], t.seq_len, uni)
    logger.summary({"val/unigram_ppl": uni, "n_params": n_params})
    if t.deterministic and rt.device.type == "cpu" and rt.precision == "bf16" and torch.get_num_threads() > 1:
        log.info("note: bf16 on %d CPU threads is reproducible only to ~1e-6; for bit-exact repeats use "
                 "trainer.precision=fp32 or OMP_NUM_THREADS=1", torch.get_num_threads())

    def save(val_loss: float) -> None:
        nonlocal best_val, last_good
        # best.pt: the lowest validation loss seen (also written once in a new folder a resumed run writes to)
        improved = val_loss < best_val or not (ckpt_dir / ckpt_lib.BEST).exists()
        best_val = min(best_val, val_loss)
        if not rt.is_main:
            return
        payload = {
            "model_cfg": to_plain(cfg.model), "pos_cfg": to_plain(cfg.pos), "data_cfg": to_plain(cfg.data),
            "train_cfg": plain, "tokenizer_json": data.tokenizer_json,
            "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if rt.use_scaler else None, "rng": rng_state(),
            "sampler": sampler.state_dict(), "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
            "wandb_run_id": logger.run_id, "metrics": {"val/loss": val_loss, "val/ppl": math.exp(val_loss)},
            "world_size": rt.world_size,
        }
        last = ckpt_dir / ckpt_lib.LAST
        if t.keep_last > 0:
            written = ckpt_lib.save_checkpoint(ckpt_dir / f"step_{step:06d}.pt", payload)
            ckpt_lib.link_checkpoint(written, last)
            ckpt_lib.prune_step_checkpoints(ckpt_dir, t.keep_last)
        else:
            written = ckpt_lib.save_checkpoint(last, payload)
        if improved:
            ckpt_lib.link_checkpoint(last, ckpt_dir / ckpt_lib.BEST)
        last_good = last

    def validate() -> float:
        val_loss = evaluate(model, val_tokens, starts, rt, t.batch_size, t.seq_len)
        ppl = math.exp(min(val_loss, 700.0))
        logger.log({"val/loss": val_loss, "val/ppl": ppl}, step=step, tokens=tokens_seen)
        log.info("step %d: val/loss %.4f, val/ppl %.2f (unigram %.1f)", step, val_loss, ppl, uni)
        return val_loss

    from tqdm.auto import tqdm

    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (t.progress and rt.is_main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
    model.train()
    val_loss = math.nan
    t_last, tokens_last = time.perf_counter(), tokens_seen
    exit_code = 1
    try:
        while step < t.max_steps:
            lr = sched.get_last_lr()[0]
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(t.grad_accum):
                x, y = sampler.next_batch()
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                sync = rt.distributed and micro < t.grad_accum - 1
                with model.no_sync() if sync else contextlib.nullcontext(), rt.autocast():
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                scaler.scale(loss / t.grad_accum).backward()
            loss_step = loss_sum / t.grad_accum
            if rt.distributed:
                dist.all_reduce(loss_step)  # SUM: gloo has no AVG
                loss_step /= rt.world_size
            loss_val = float(loss_step)
            if not math.isfinite(loss_val):
                raise TrainingDiverged(
                    f"train/loss is {loss_val} at step {step + 1}; stopped. Last good checkpoint: "
                    f"{last_good or 'none (no checkpoint written yet)'}. Lower optim.lr or raise optim.warmup_steps, "
                    "then resume with trainer.resume=<that checkpoint>"
                )
            scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                             cfg.optim.grad_clip or float("inf")))
            if not math.isfinite(grad_norm) and not rt.use_scaler:  # fp16: the scaler skips the step itself
                raise TrainingDiverged(
                    f"train/grad_norm is {grad_norm} at step {step + 1}; stopped. Last good checkpoint: "
                    f"{last_good or 'none (no checkpoint written yet)'}"
                )
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            tokens_seen += tokens_per_step
            bar.update(1)

            if step % t.log_interval == 0 or step == t.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                logger.log({"train/loss": loss_val, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tps}, step=step, tokens=tokens_seen)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_steps:
                val_loss = validate()
                save(val_loss)
                t_last, tokens_last = time.perf_counter(), tokens_seen  # throughput excludes validation
        if not math.isfinite(val_loss):  # resumed at or past max_steps: nothing trained, still report
            val_loss = validate()
            best_val = min(best_val, val_loss)
        exit_code = 0
    finally:
        bar.close()
        if exit_code == 0:
            logger.summary({"final/val_loss": val_loss, "final/val_ppl": math.exp(val_loss),
                            "best/val_loss": best_val, "best/val_ppl": math.exp(best_val),
                            "val/unigram_ppl": uni, "tokens_seen": tokens_seen})
        logger.finish(exit_code=exit_code)
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
    log.info("done: step %d, %d tokens; val/loss %.4f, val/ppl %.2f (best %.2f; unigram %.1f); checkpoints in %s",
             step, tokens_seen, val_loss, math.exp(val_loss), math.exp(best_val), uni, ckpt_dir)
    return best_val
