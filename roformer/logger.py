"""Every dashboard call: the logger settings, a training run's metrics (``metrics.jsonl`` and wandb) and the
evaluation runs that :mod:`roformer.eval_run` logs to wandb.

:func:`make_logger` gives rank 0 a :class:`RunLogger` and every other rank a :class:`NullLogger` with the same
methods, so the training loop has no ``if rank == 0`` around its logging.

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
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from roformer.files import one_line

log = logging.getLogger(__name__)


class LoggerKind(str, Enum):
    wandb = "wandb"
    none = "none"  # metrics still go to <run_dir>/metrics.jsonl


class WandbMode(str, Enum):
    auto = "auto"  # online when logged in (WANDB_API_KEY or ~/.netrc), else offline; WANDB_MODE wins if set
    online = "online"
    offline = "offline"  # files under <run_dir>/wandb, upload later with `wandb sync`
    disabled = "disabled"


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


def wandb_init(cfg: LoggerConfig, mode: str, run_dir: Path, **kwargs):
    """``wandb.init`` with this project's settings (no console capture, quiet); ``kwargs`` add or override
    (config, id, resume, name, group, job_type, reinit)."""
    import wandb  # optional at run time: logger.kind=none never imports it (slow to import, network client)

    args = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=cfg.job_type, tags=list(cfg.tags),
                name=cfg.name, dir=str(run_dir), mode=mode,
                settings=wandb.Settings(console="off", quiet=True, init_timeout=60))
    return wandb.init(**{**args, **kwargs})


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
            warnings.warn(f"wandb {what} failed ({type(e).__name__}: {one_line(e, 200)}); continuing without wandb",
                          RuntimeWarning, stacklevel=3)
            self._warned = True
        self._run = None

    def _start_wandb(self, config: dict) -> None:
        mode = wandb_mode(self.cfg.mode)
        if mode == "disabled":
            return
        try:
            # the same id continues the same run after trainer.resume
            self._run = wandb_init(self.cfg, mode, self.run_dir, config=config, id=self.run_id, resume="allow")
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


# ----------------------------------------------------------------------------------------------------------
# Evaluation runs

# the result table's columns on the dashboard: the CSV's, less what is the same for every row of one checkpoint or
# only for accounting
EVAL_TABLE_SKIP = {"label", "scheme", "seed", "train_len", "nll_sum", "bytes", "words", "note"}


def log_evaluation(results: dict, cfg: LoggerConfig, out_dir: Path, columns: list[str]) -> None:
    """One ``eval`` run per checkpoint, in its training run's group: a table, a line chart, eval/ppl@L.

    ``columns`` are the result files' (CSV) columns. A dashboard failure warns and never loses the result files.
    """
    if cfg.kind != LoggerKind.wandb or wandb_mode(cfg.mode) == "disabled":
        return
    try:
        import wandb  # optional: only with logger=wandb (see wandb_init)

        for ck in results["checkpoints"]:
            rows = [r for r in results["results"] if r["label"] == ck["label"]]
            run = wandb_init(cfg, wandb_mode(cfg.mode), out_dir, group=cfg.group or ck.get("group"), job_type="eval",
                             name=f"{ck['label']}-eval", reinit="finish_previous",
                             config={"checkpoint": ck["path"], "settings": results["settings"], "train": ck["config"]})
            cols = [c for c in columns if c not in EVAL_TABLE_SKIP]
            table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            ok = [r for r in rows if r["status"] == "ok" and r["protocol"] == "nonoverlapping"]
            line = wandb.Table(
                columns=["length", "ppl", "series"], data=[[r["length"], r["ppl"], f"{r['variant']}"] for r in ok]
            )
            run.log(
                {
                    "eval/results": table,
                    "eval/ppl_vs_length": wandb.plot.line(
                        line, "length", "ppl", stroke="series", title="perplexity vs evaluation length"
                    ),
                }
            )
            for r in rows:
                if r["status"] != "ok":
                    continue
                suffix = "" if r["rope_scaling"] == "none" else f"/{r['rope_scaling']}"
                if r["protocol"] == "nonoverlapping":
                    run.summary[f"eval/ppl@{r['length']}{suffix}"] = r["ppl"]
                run.summary[f"eval/{r['protocol']}/ppl@{r['length']}{suffix}"] = r["ppl"]
            run.finish()
    except Exception as e:  # never lose the files because a dashboard failed
        warnings.warn(
            f"wandb logging of the evaluation failed ({type(e).__name__}: {one_line(e, 200)}); "
            "the result files are written",
            RuntimeWarning,
            stacklevel=2,
        )
