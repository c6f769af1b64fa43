"""Rank-0 side effects of a run behind one object: metrics to ``metrics.jsonl`` and to wandb.

:func:`make_logger` gives rank 0 a :class:`RunLogger` and every other rank a :class:`NullLogger` with the same
methods, so the training loop has no ``if rank == 0`` around its logging (STYLE.md, lesson 9).

wandb is optional at every level: ``logger.kind=none`` never imports it; ``logger.mode=auto`` runs online only
when the user is logged in (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``) and offline
otherwise (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later); an explicit ``WANDB_MODE`` in the
environment wins over ``auto``. Any wandb failure, at start or mid-run, warns once and switches wandb off for
the rest of the run: a dashboard never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import warnings
from pathlib import Path

from roformer.config import LoggerConfig, LoggerKind, WandbMode

log = logging.getLogger(__name__)

# x-axes of the dashboard: train/* and val/* are plotted against the optimizer step (and can be switched to
# tokens seen in the UI)
STEP_METRIC, TOKENS_METRIC = "trainer/step", "trainer/tokens"


def new_run_id() -> str:
    """A wandb-compatible run id, chosen by us so a checkpoint can carry it before wandb starts."""
    return secrets.token_hex(4)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def wandb_mode(mode: WandbMode) -> str:
    """The wandb mode a run uses: ``auto`` -> WANDB_MODE if set, else online when logged in, else offline."""
    mode = WandbMode(mode)
    if mode != WandbMode.auto:
        return mode.value
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if wandb_logged_in() else "offline"


def _clean(metrics: dict) -> dict:
    return {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, int | bool) else v)
            for k, v in metrics.items()}


class NullLogger:
    """What ranks other than 0 get: every method does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict, step: int, tokens: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class RunLogger(NullLogger):
    """Rank 0: appends every logged dict to ``<run_dir>/metrics.jsonl`` and, with ``kind=wandb``, to wandb."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, run_id: str | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_id = run_id or new_run_id()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._run = None
        self._warned = False
        if cfg.kind == LoggerKind.wandb:
            self._start_wandb(config)

    # -- wandb, guarded ---------------------------------------------------------------------------------------

    def _fail(self, what: str, e: BaseException) -> None:
        if not self._warned:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"wandb {what} failed ({type(e).__name__}: {msg[:200]}); continuing without wandb",
                          RuntimeWarning, stacklevel=3)
            self._warned = True
        self._run = None

    def _start_wandb(self, config: dict) -> None:
        mode = wandb_mode(self.cfg.mode)
        if mode == "disabled":
            return
        try:
            import wandb

            self._run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.cfg.group,
                job_type=self.cfg.job_type,
                tags=list(self.cfg.tags),
                name=self.cfg.name,
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                id=self.run_id,
                resume="allow",  # the same id continues the same run after trainer.resume
                settings=wandb.Settings(console="off", quiet=True, init_timeout=60),
            )
            self._run.define_metric(STEP_METRIC)
            self._run.define_metric(TOKENS_METRIC, step_metric=STEP_METRIC)
            for pattern in ("train/*", "val/*"):
                self._run.define_metric(pattern, step_metric=STEP_METRIC)
            self._run.define_metric("val/loss", step_metric=STEP_METRIC, summary="min")
            self._run.define_metric("val/ppl", step_metric=STEP_METRIC, summary="min")
            log.info("wandb %s run %s (%s)", mode, self.run_id, self.run_dir / "wandb")
        except Exception as e:  # no network, bad entity, not installed, ...
            self._fail("init", e)

    # -- the interface ----------------------------------------------------------------------------------------

    def log(self, metrics: dict, step: int, tokens: int | None = None) -> None:
        row = {STEP_METRIC: step, **({TOKENS_METRIC: tokens} if tokens is not None else {}), **_clean(metrics)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in row.items()}) + "\n")
        if self._run is not None:
            try:
                self._run.log(row)
            except Exception as e:
                self._fail("log", e)

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            try:
                for k, v in _clean(metrics).items():
                    self._run.summary[k] = v
            except Exception as e:
                self._fail("summary", e)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero exit code marks it failed in wandb."""
        if self._run is not None:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as e:
                self._fail("finish", e)
            self._run = None


def make_logger(cfg: LoggerConfig, run_dir: Path, config: dict, *, run_id: str | None, rank: int) -> NullLogger:
    """RunLogger on rank 0, NullLogger elsewhere."""
    if rank != 0:
        return NullLogger()
    return RunLogger(cfg, run_dir, config, run_id=run_id)
