"""The training loop: validation, one step, and ``train()``; its settings are :mod:`roformer.train_config`'s, the
optimiser and its schedule :mod:`roformer.optim`'s.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of ``seq_len`` tokens on each of
``world_size`` ranks, so the global batch is ``batch_size x world_size x grad_accum`` sequences. DDP averages
gradients over ranks, and the loss of a micro-batch is divided by ``grad_accum``, so one step sees the mean loss
over the global batch whatever its split into ranks and micro-batches (``WindowSampler`` gives the ranks
disjoint slices of one seeded global batch, so the windows are the same too).

Task data (``data=task``): the sampler is chosen by the data (:func:`make_sampler`). A split of task examples is
drawn as whole examples padded to one width, with the targets of prompt and padding set to ``IGNORE_INDEX`` so
that the loss (the model's cross-entropy ignores them) is on the answers only (``ExampleSampler``); validation is
the same loss over every validation example (:func:`evaluate_examples`) instead of windows.

Device, precision, ranks and seeds are set up by :mod:`roformer.runtime`; checkpoints are built, written and
checked by :mod:`roformer.checkpoint`; metrics go through :mod:`roformer.logger`.

Exact resume: a checkpoint holds model, optimizer, scheduler, GradScaler, sampler and every RNG state, taken
after the step's update; validation consumes no randomness. On CPU with ``trainer.deterministic=true`` a run
resumed at step N is bit for bit the uninterrupted run (tests/test_training.py checks it), and two runs of
one config are identical, in fp32 at any thread count and in bf16 on one thread. bf16 on several threads
drifts in the last digits of the loss from the second step (oneDNN's multithreaded bf16 kernels do not reduce
in a fixed order); use ``trainer.precision=fp32`` or ``OMP_NUM_THREADS=1`` for bit-exact runs. What a resume may
change, and what it does to the run folder, is :mod:`roformer.resume`'s.

Fine-tuning (``trainer.init_from=RUN|FILE``): a fresh run whose model starts from another checkpoint's weights, on
every rank before any wrap; the optimizer, the schedule (from step 0) and the counters start afresh, and every
checkpoint records where the weights came from (``init_from``). A checkpoint to resume wins over it. The checks
(same architecture and tokenizer; RoPE's ``pos.scaling`` may change, with a longer ``trainer.seq_len``) are
:mod:`roformer.resume`'s.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from roformer import checkpoint as ckpt_lib
from roformer.data import IGNORE_INDEX, ExampleSampler, PreparedData, TokenSplit, WindowSampler, example_batch, prepare
from roformer.files import ensure_writable, to_plain
from roformer.logger import NullLogger, make_logger
from roformer.model import TransformerLM
from roformer.optim import OptimConfig, build_optimizer, set_hyperparameters
from roformer.resume import InitFrom, Resume, claim_run_dir, read_init_from, read_resume
from roformer.runtime import Runtime, compile_model, resolve_compile, rng_state, seed_everything, setup_runtime
from roformer.signals import StopSignals

# the settings live in train_config.py; named here too, where the loop that reads them is
from roformer.train_config import TrainConfig, TrainerConfig  # noqa: F401

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


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
def mean_loss(model, batches, rt: Runtime) -> float:
    """Mean next-token loss over this rank's ``batches`` of (x, y) token ids, targets equal to IGNORE_INDEX not
    counted; the sums are all-reduced over ranks. The model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = torch.zeros((), dtype=torch.float64, device=rt.device)
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            _, loss = model(x, y, reduction="sum")  # ignored targets (a task's prompt, padding) add nothing
        nll += loss.double()
        count += (y != IGNORE_INDEX).sum()
    if rt.distributed:
        dist.all_reduce(nll)
        dist.all_reduce(count)
    model.train(was_training)
    return float(nll / count)


def evaluate(model, tokens: np.ndarray, starts: np.ndarray, rt: Runtime, batch_size: int, seq_len: int) -> float:
    """Mean next-token loss over the windows at ``starts`` (this rank takes every world_size-th window)."""
    mine, ar = starts[rt.rank :: rt.world_size], np.arange(seq_len + 1)
    windows = (torch.from_numpy(np.asarray(tokens[mine[i : i + batch_size, None] + ar], dtype=np.int64))
               for i in range(0, len(mine), batch_size))
    return mean_loss(model, ((w[:, :-1], w[:, 1:]) for w in windows), rt)


def evaluate_examples(model, split: TokenSplit, rt: Runtime, batch_size: int) -> float:
    """Task examples (data=task): the mean loss on the answers of every example of ``split``, prompts masked as in
    training (this rank takes every world_size-th batch)."""
    idx = np.arange(split.n_docs)
    width = int(np.diff(split.doc_offsets).max()) - 1  # one shape for every batch (a compiled model keeps its graph)
    return mean_loss(model, (example_batch(split, idx[i : i + batch_size], width)
                             for i in range(rt.rank * batch_size, split.n_docs, batch_size * rt.world_size)), rt)


# ----------------------------------------------------------------------------------------------------------
# What a step changes, and what moves between steps


@dataclass
class Trainee:
    """The objects a step changes. ``model`` is what runs (compiled and/or DDP-wrapped); ``raw`` is the bare
    model whose parameters are clipped and whose state is checkpointed."""

    raw: TransformerLM
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: WindowSampler | ExampleSampler


@dataclass
class Progress:
    """What advances with each step and is carried by every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    run_id: str | None = None  # the wandb run this run logs to, kept across resumes
    last_good: Path | None = None  # the newest checkpoint, named when training diverges
    overrides: list[dict] = field(default_factory=list)  # every resume's trainer.resume_override changes
    init_from: dict | None = None  # where the weights of a fine-tune came from (trainer.init_from), kept on resume


def build(cfg: TrainConfig, rt: Runtime, train: np.ndarray | TokenSplit) -> Trainee:
    """A fresh model, optimiser, schedule, scaler and sampler (in this order: the model's init draws from the
    seeded generator). ``train``: the training token stream, or the training split."""
    t = cfg.trainer
    model = TransformerLM(cfg.model, cfg.pos).to(rt.device)
    opt, sched = build_optimizer(model, cfg.optim, t.max_steps, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.use_scaler)
    return Trainee(model, model, opt, sched, scaler, make_sampler(train, t, cfg.seed, rt))


def make_sampler(train: np.ndarray | TokenSplit, t: TrainerConfig, seed: int, rt: Runtime):
    """The training batches the data asks for: whole padded examples with the loss on their answers for a split of
    task examples (data=task), else random windows of the token stream."""
    if isinstance(train, TokenSplit) and train.prompt_lens is not None:
        return ExampleSampler(train, t.seq_len, t.batch_size, seed=seed, rank=rt.rank, world_size=rt.world_size)
    tokens = train.tokens if isinstance(train, TokenSplit) else train
    return WindowSampler(tokens, t.seq_len, t.batch_size, seed=seed, rank=rt.rank, world_size=rt.world_size)


def restore(tr: Trainee, resumed: Resume, cfg: TrainConfig) -> Progress:
    """Load a checkpoint's states into ``tr`` and every RNG (roformer.resume), then this run's optim.* and
    trainer.max_steps (a longer run than the checkpointed one extends the schedule to the new end)."""
    resumed.load_into(tr)
    set_hyperparameters(tr.opt, tr.sched, cfg.optim, cfg.trainer.max_steps)
    state = resumed.state
    log.info("resumed from %s at step %d", resumed.path, state["step"])
    return Progress(state["step"], state["tokens_seen"], state["best_val_loss"], state.get("wandb_run_id"),
                    resumed.path, resumed.overrides, state.get("init_from"))


def wrap(tr: Trainee, t: TrainerConfig, rt: Runtime) -> None:
    """torch.compile (where trainer.compile says) and DDP around the bare model."""
    if resolve_compile(t.compile, rt.device, t.max_steps):
        log.info("torch.compile: on (trainer.compile=%s, %d steps, scope %s)", t.compile, t.max_steps,
                 t.compile_scope)  # fmt: skip
        tr.model = compile_model(tr.model, t.compile_scope)
    if rt.distributed:
        tr.model = DDP(tr.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def _diverged(what: str, value: float, step: int, last_good: Path | None, optim: OptimConfig) -> TrainingDiverged:
    """The one line a diverged run ends with: what went non-finite, and what to change and how to go on."""
    fix = (f"lower optim.lr (now {optim.lr:g}) or raise optim.warmup_steps (now {optim.warmup_steps}), then "
           + (f"resume the last good checkpoint: trainer.resume={last_good} "
              "trainer.resume_override=[optim.lr,optim.warmup_steps]" if last_good is not None
              else "start again (no checkpoint was written yet)"))  # fmt: skip
    return TrainingDiverged(f"{what} is {value} at step {step}; stopped: {fix}")


def train_step(tr: Trainee, rt: Runtime, t: TrainerConfig, optim: OptimConfig, p: Progress) -> tuple[float, float]:
    """One optimiser step over ``grad_accum`` micro-batches: (mean loss over the global batch, gradient norm)."""
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(t.grad_accum):
        x, y = tr.sampler.next_batch()
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        sync = rt.distributed and micro < t.grad_accum - 1
        with tr.model.no_sync() if sync else contextlib.nullcontext(), rt.autocast():
            _, loss = tr.model(x, y)
        loss_sum += loss.detach()
        tr.scaler.scale(loss / t.grad_accum).backward()
    loss_step = loss_sum / t.grad_accum
    if rt.distributed:
        dist.all_reduce(loss_step)  # SUM: gloo has no AVG
        loss_step /= rt.world_size
    loss_val = float(loss_step)
    if not math.isfinite(loss_val):
        raise _diverged("train/loss", loss_val, p.step + 1, p.last_good, optim)
    tr.scaler.unscale_(tr.opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(tr.raw.parameters(), optim.grad_clip or float("inf")))
    if not math.isfinite(grad_norm) and not rt.use_scaler:  # fp16: the scaler skips the step itself
        raise _diverged("train/grad_norm", grad_norm, p.step + 1, p.last_good, optim)
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    tr.opt.zero_grad(set_to_none=True)
    tr.sched.step()
    return loss_val, grad_norm


def save(tr: Trainee, cfg: TrainConfig, data: PreparedData, rt: Runtime, p: Progress, val_loss: float | None,
         ckpt_dir: Path, logger: NullLogger) -> None:
    """Checkpoint the step just done (rank 0 writes; every rank tracks the best validation loss). ``val_loss``
    None: an interrupt checkpoint, not validated, so it is never best.pt and leaves best_val as it was."""
    # best.pt: the lowest validation loss seen (also written once in a new folder a resumed run writes to)
    best = val_loss is not None and (val_loss < p.best_val or not (ckpt_dir / ckpt_lib.BEST).exists())
    p.best_val = min(p.best_val, math.inf if val_loss is None else val_loss)
    if not rt.is_main:
        return
    payload = ckpt_lib.build_payload(
        train_cfg=cfg, tokenizer_json=data.tokenizer_json, model=tr.raw, optimizer=tr.opt, scheduler=tr.sched,
        scaler=tr.scaler if rt.use_scaler else None, sampler=tr.sampler, rng=rng_state(), step=p.step,
        tokens_seen=p.tokens_seen, best_val_loss=p.best_val, wandb_run_id=logger.run_id,
        metrics={} if val_loss is None else {"val/loss": val_loss, "val/ppl": math.exp(val_loss)},
        world_size=rt.world_size, resume_overrides=p.overrides, init_from=p.init_from)
    p.last_good = ckpt_lib.write_run_checkpoint(ckpt_dir, payload, keep_last=cfg.trainer.keep_last, best=best)


# ----------------------------------------------------------------------------------------------------------
# The loop


def _shared_run_dir(run_dir: str | os.PathLike, rt: Runtime) -> Path:
    """Rank 0's folder is the run's (train.py gives the other ranks a dummy one)."""
    if rt.distributed:
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return Path(run_dir)


def _init_from(cfg: TrainConfig, resumed: Resume | None) -> InitFrom | None:
    """The checkpoint trainer.init_from names, read and checked; None without one, or when a resume wins over it."""
    if not cfg.trainer.init_from:
        return None
    if resumed is not None:
        log.info("trainer.init_from=%s ignored: resuming %s instead", cfg.trainer.init_from, resumed.path)
        return None
    return read_init_from(cfg)


def _start(cfg: TrainConfig, run_dir: Path, data: PreparedData | None,
           rt: Runtime) -> tuple[TrainConfig, PreparedData, Trainee, Progress]:
    """Everything before the first step: a resume or the weights to fine-tune checked against this run (a refusal
    writes nothing), the data, the model fresh, initialised or restored, then the run folder claimed by rank 0
    (roformer.resume.claim_run_dir)."""
    t = cfg.trainer
    if rt.is_main:
        ensure_writable(run_dir / "checkpoints", "hydra.run.dir")
    resumed = read_resume(cfg, run_dir, rt.world_size)
    init = _init_from(cfg, resumed)
    seed_everything(cfg.seed, t.deterministic)
    if data is None:
        data = prepare(cfg.data, rank=rt.rank, world_size=rt.world_size, progress=t.progress and rt.is_main)
    # the model's vocabulary is the tokenizer's (a small corpus may give fewer merges than data.vocab_size)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = data.vocab_size
    for source in (resumed, init):
        if source is not None:
            source.check_tokenizer(data.vocab_size, data.tokenizer_json)
    tr = build(cfg, rt, data.splits["train"])
    p = restore(tr, resumed, cfg) if resumed is not None else Progress()
    if init is not None:  # every rank loads the same weights, before compile and DDP
        init.load_into(tr.raw)
        p.init_from = init.provenance
        log.info("initialised from %s (step %d)", init.path, init.step)
    if rt.is_main:
        claim_run_dir(run_dir, None if resumed is None else p.step)
        if resumed is not None:
            resumed.announce()
    return cfg, data, tr, p


def _start_logging(cfg: TrainConfig, rt: Runtime, run_dir: Path, tr: Trainee, data: PreparedData,
                   p: Progress) -> tuple[NullLogger, float]:
    """The run's logger (rank 0 logs; wandb continues the checkpoint's run) and the unigram baseline."""
    t = cfg.trainer
    n_params = tr.raw.num_params()
    global_batch = t.batch_size * rt.world_size * t.grad_accum
    run_info = {"world_size": rt.world_size, "global_batch": global_batch,
                "tokens_per_step": global_batch * tr.sampler.seq_len,
                "n_params": n_params, "precision_resolved": rt.precision, "device_resolved": str(rt.device),
                "run_dir": str(run_dir)}
    logger = make_logger(cfg.logger, run_dir, {**to_plain(cfg), "run": run_info}, run_id=p.run_id, rank=rt.rank)
    train_tokens, val_tokens = data.splits["train"].tokens, data.splits["validation"].tokens
    uni = unigram_ppl(train_tokens, val_tokens, data.vocab_size) if rt.is_main else float("nan")
    log.info("model %s, %.2fM params, pos=%s; %s on %s x%d; global batch %d x %d tokens; unigram val ppl %.1f",
             cfg.model.attention.value, n_params / 1e6, cfg.pos.name, rt.precision, rt.device.type, rt.world_size,
             global_batch, tr.sampler.seq_len, uni)
    logger.summary({"val/unigram_ppl": uni, "n_params": n_params})
    if t.deterministic and rt.device.type == "cpu" and rt.precision == "bf16" and torch.get_num_threads() > 1:
        log.info("note: bf16 on %d CPU threads is reproducible only to ~1e-6; for bit-exact repeats use "
                 "trainer.precision=fp32 or OMP_NUM_THREADS=1", torch.get_num_threads())
    return logger, uni


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, data: PreparedData | None = None) -> float:
    """Train as ``cfg`` says, writing checkpoints and metrics under ``run_dir`` (rank 0).

    Returns the best validation loss (the objective a Hydra sweeper minimises). ``data`` skips
    :func:`roformer.data.prepare` (tests pass small corpora). Raises ``ValueError`` for bad input before any
    training step, :class:`TrainingDiverged` when the loss stops being finite, and
    :class:`~roformer.signals.Interrupted` after a stop signal (SIGINT, SIGTERM, SIGUSR1, submitit's SIGUSR2), once
    the step is finished and checkpointed. The signal handlers are train()'s only while it runs.
    """
    with StopSignals() as stop:
        return _train(cfg, run_dir, data, stop)


def _train(cfg: TrainConfig, run_dir: str | os.PathLike, data: PreparedData | None, stop: StopSignals) -> float:
    """train()'s body; ``stop`` holds the stop signals."""
    t = cfg.trainer
    rt = setup_runtime(t.device, t.precision, t.threads)
    run_dir = _shared_run_dir(run_dir, rt)
    log.setLevel(logging.INFO if rt.is_main else logging.WARNING)
    ckpt_dir = run_dir / "checkpoints"
    cfg, data, tr, p = _start(cfg, run_dir, data, rt)
    val = data.splits["validation"]
    if val.prompt_lens is None:  # a corpus: fixed windows of the validation stream
        starts = eval_starts(len(val.tokens), t.seq_len, t.eval_iters * t.batch_size * rt.world_size)
        val_loss_of = lambda model: evaluate(model, val.tokens, starts, rt, t.batch_size, t.seq_len)
    else:  # task examples (data=task): the loss on the answers of every validation example
        val_loss_of = lambda model: evaluate_examples(model, val, rt, t.batch_size)
    wrap(tr, t, rt)
    tokens_per_step = t.batch_size * tr.sampler.seq_len * t.grad_accum * rt.world_size  # seq_len: the batches' width
    logger, uni = _start_logging(cfg, rt, run_dir, tr, data, p)

    def validate() -> float:
        val_loss = val_loss_of(tr.model)
        ppl = math.exp(min(val_loss, 700.0))
        logger.log({"val/loss": val_loss, "val/ppl": ppl}, step=p.step, tokens=p.tokens_seen)
        log.info("step %d: val/loss %.4f, val/ppl %.2f (unigram %.1f)", p.step, val_loss, ppl, uni)
        return val_loss

    bar = tqdm(total=t.max_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (t.progress and rt.is_main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
    tr.model.train()
    stop.defer(rt.rank)  # from here a first stop signal waits for the end of the step
    val_loss, exit_code = math.nan, 1
    t_last, tokens_last = time.perf_counter(), p.tokens_seen
    try:
        while p.step < t.max_steps:
            lr = tr.opt.param_groups[0]["lr"]  # this update's (set by the schedule's last step, or by a resume)
            loss, grad_norm = train_step(tr, rt, t, cfg.optim, p)
            p.step += 1
            p.tokens_seen += tokens_per_step
            bar.update(1)
            if p.step % t.log_interval == 0 or p.step == t.max_steps:
                now = time.perf_counter()
                tps = (p.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, p.tokens_seen
                logger.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tps}, step=p.step, tokens=p.tokens_seen)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            validated = (t.eval_interval and p.step % t.eval_interval == 0) or p.step == t.max_steps
            if validated:
                val_loss = validate()
                save(tr, cfg, data, rt, p, val_loss, ckpt_dir, logger)
                t_last, tokens_last = time.perf_counter(), p.tokens_seen  # throughput excludes validation
            if p.step < t.max_steps and stop.requested(rt):  # a stop signal on any rank: checkpoint, then end
                if not validated:
                    save(tr, cfg, data, rt, p, None, ckpt_dir, logger)
                raise stop.interrupted(rt, p.step, p.last_good)
        if not math.isfinite(val_loss):  # resumed at or past max_steps: nothing trained, still report
            val_loss = validate()
            p.best_val = min(p.best_val, val_loss)
        exit_code = 0
    finally:
        bar.close()
        if exit_code == 0:
            logger.summary({"final/val_loss": val_loss, "final/val_ppl": math.exp(val_loss),
                            "best/val_loss": p.best_val, "best/val_ppl": math.exp(p.best_val),
                            "val/unigram_ppl": uni, "tokens_seen": p.tokens_seen})
        logger.finish(exit_code=exit_code)
        if rt.distributed and dist.is_initialized():
            if exit_code == 0:  # leave together: a rank that tears down while another still saves can abort it
                dist.barrier()
            dist.destroy_process_group()
    log.info("done: step %d, %d tokens; val/loss %.4f, val/ppl %.2f (best %.2f; unigram %.1f); checkpoints in %s",
             p.step, p.tokens_seen, val_loss, math.exp(val_loss), math.exp(p.best_val), uni, ckpt_dir)
    return p.best_val
