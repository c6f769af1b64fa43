"""Stop signals: finish the step, checkpoint it, say how to resume; and SLURM preemption through submitit.

The flow (``train()`` holds the handlers only while it runs and puts the previous ones back when it ends):

* Before the first step (data preparation, model build) a stop signal raises :class:`Interrupted` at once: there
  is nothing to save.
* From the first step on (:meth:`StopSignals.defer`) the first signal is only noted. The loop finishes the step,
  writes a checkpoint of it through the normal path (not validated, so it never becomes best.pt and leaves the
  best validation loss alone: a resumed run makes the same choices as an uninterrupted one) and raises
  :class:`Interrupted`. train.py prints one line with the command that resumes and exits 128 + the signal: 130
  for SIGINT, 143 for SIGTERM, and 143 for SIGUSR1/SIGUSR2 too (what shells and schedulers read as "stopped on
  request"; 138/140 would only name the signal).
* A second Ctrl-C (SIGINT) raises :class:`Interrupted` (``aborted``) at once, wherever the loop is; checkpoints
  are written atomically, so the previous one stays whole. Other repeated signals are ignored: torchrun and
  SLURM pass on the signals they receive, so a process can be asked twice to stop.
* Under DDP the ranks all-reduce (max) their signal number after every step, so all stop after the same step
  (one scalar collective a step; none in a single process), and leave together once rank 0 has saved.
* SLURM through hydra-submitit-launcher: submitit sends SIGUSR2 (``SUBMITIT_PREEMPT_SIGNAL``) ``signal_delay_s``
  before the time limit, or on preemption where the cluster signals it, and its handler calls the launcher's
  ``checkpoint()`` and requeues the job. That handler was installed before train(), so :func:`exit_interrupted`
  calls it once our checkpoint is written; the requeued job runs in the same folder, and
  :func:`requeue_resume` continues it (SLURM_RESTART_COUNT > 0). A plain SIGTERM (scancel, or preemption without
  a user signal) checkpoints and exits 143; SLURM itself requeues preempted jobs where PreemptMode=REQUEUE, and
  the restart resumes the same way.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# hydra settings that make a sweep job what it is; a single run that resumes it needs none of them
SWEEP_KEYS = ("hydra.mode", "hydra.sweep.", "hydra/launcher", "hydra.launcher.", "hydra/sweeper", "hydra.sweeper.")


def preempt_signal() -> signal.Signals:
    """The signal submitit sends before a time limit or a preemption (its ``SUBMITIT_PREEMPT_SIGNAL``, USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def stop_signals() -> tuple[signal.Signals, ...]:
    return tuple(dict.fromkeys((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, preempt_signal())))


class Interrupted(BaseException):
    """A stop signal ended train(). A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way (a guarded wandb call, a data loader) swallows it.

    ``step`` and ``checkpoint``: the step just checkpointed, or None when nothing was saved (before the first
    step, or ``aborted`` by a second signal). ``previous``: the handler the signal had before train().
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None, *,
                 aborted: bool = False, rank: int = 0, previous: Any = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.aborted, self.rank, self.previous = aborted, rank, previous
        super().__init__(f"{self.name} at step {step}" if checkpoint else self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else 128 + signal.SIGTERM


class StopSignals:
    """Catch the stop signals while a ``with`` block runs (train()), then put the previous handlers back.

    Until :meth:`defer` a signal raises :class:`Interrupted` at once; after it the first one is noted for
    :meth:`requested`, and a second SIGINT raises ``Interrupted(aborted=True)``. Outside the main thread (where
    Python cannot set handlers) it does nothing.
    """

    def __init__(self, signals: Sequence[int] | None = None):
        self.signals = stop_signals() if signals is None else tuple(signals)
        self.received: int | None = None  # this process's first signal
        self.agreed: int | None = None  # the signal every rank stops for (DDP: the largest any rank received)
        self.deferring, self.rank = False, 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            if not self.deferring:
                raise Interrupted(signum, rank=self.rank, previous=self.previous.get(signum))
        elif signum == signal.SIGINT:  # a second Ctrl-C: the person wants out now
            raise Interrupted(signum, aborted=True, rank=self.rank, previous=self.previous.get(signum))
        # a repeated SIGTERM/SIGUSR1/SIGUSR2 changes nothing: launchers (torchrun, SLURM) pass on what they receive,
        # so a process may get the same stop request twice

    def defer(self, rank: int) -> None:
        """From now on (the first step) a first signal waits for the end of the step."""
        self.deferring, self.rank = True, rank

    def requested(self, rt) -> bool:
        """Whether to stop after this step. Under DDP every rank calls this after every step and they agree: the
        all-reduce (max) of the signal numbers they received."""
        if not rt.distributed:
            self.agreed = self.received
        else:
            flag = torch.tensor([float(self.received or 0)], device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.agreed = int(flag.item()) or None
        return self.agreed is not None

    def interrupted(self, rt, step: int, checkpoint: Path | None) -> Interrupted:
        """The exception that ends train() after the checkpoint of ``step`` (logged on rank 0). Under DDP the ranks
        leave together, once rank 0 has written it (a launcher that sees one rank exit stops the others)."""
        if rt.distributed:
            dist.barrier()
        signum = self.received or self.agreed
        if self.rank == 0:
            log.info("%s: stopped after step %d; checkpoint %s", signal.Signals(signum).name, step, checkpoint)
        return Interrupted(signum, step, checkpoint, rank=self.rank, previous=self.previous.get(signum))


def exit_interrupted(e: Interrupted, message: str | None) -> NoReturn:
    """End the process after ``e``: print ``message`` (rank 0) to stderr, let the handler the signal had before
    train() act on it (under submitit: checkpoint the job and requeue it; it exits itself), then exit with
    ``e.exit_code``. Further stop signals are ignored first: the process is ending, and a late second Ctrl-C
    must not print a KeyboardInterrupt traceback."""
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)
    if message:
        print(message, file=sys.stderr, flush=True)
    handler: Callable | Any = e.previous
    if callable(handler) and handler is not signal.default_int_handler:
        handler(e.signum, None)
    sys.exit(e.exit_code)


# ----------------------------------------------------------------------------------------------------------
# Resuming: the command a person runs, and the decision a requeued job makes


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def resume_command(overrides: Sequence[str], run_dir: str | os.PathLike, *, resume: bool = True,
                   launcher: Sequence[str] = ("python", "train.py")) -> str:
    """``python train.py`` (``launcher``: torchrun's for a DDP run) with a run's overrides as given, less any sweep
    setting and hydra.run.dir, then ``hydra.run.dir=RUN``; with ``resume`` (RUN has a checkpoint), less
    trainer.resume, then trainer.resume=auto. Quoted for a POSIX shell."""
    drop = ("hydra.run.dir", "trainer.resume") if resume else ("hydra.run.dir",)
    kept = [o for o in overrides if _key(o) not in drop and not _key(o).startswith(SWEEP_KEYS)]
    tail = [f"hydra.run.dir={run_dir}"] + (["trainer.resume=auto"] if resume else [])
    return shlex.join([*launcher, *kept, *tail])


def interrupt_message(e: Interrupted, command: str, *, can_resume: bool) -> str:
    """The one line train.py prints; ``can_resume``: the run folder has a checkpoint (``command`` resumes it)."""
    if e.checkpoint is not None:
        return f"interrupted at step {e.step}; resume with: {command}"
    what = (f"aborted by a second {e.name} without saving this step" if e.aborted
            else f"interrupted by {e.name} before the first step")
    if can_resume:
        return f"{what}; resume from the last checkpoint with: {command}"
    return f"{what}; no checkpoint yet; start again with: {command}"


def requeue_resume(resume: str, own_checkpoint: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """trainer.resume for this start: as given, except that a job SLURM has restarted (``SLURM_RESTART_COUNT`` >
    0: requeued by submitit after its signal, or by SLURM after a preemption or node failure) with
    ``trainer.resume=""`` continues ``own_checkpoint``, the last.pt its own run folder holds. Outside a SLURM
    restart a run with resume="" starts fresh whatever its folder holds."""
    env = os.environ if environ is None else environ
    try:
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    if resume or restarts < 1 or own_checkpoint is None:
        return resume
    log.info("SLURM restart %d of this job: continuing %s (trainer.resume=auto)", restarts, own_checkpoint)
    return "auto"
