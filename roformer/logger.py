"""Every dashboard call: the logger settings, a training run's metrics (``metrics.jsonl`` and wandb) and the
evaluation runs that :mod:`roformer.eval_run` logs to wandb.

:func:`make_logger` gives rank 0 a :class:`RunLogger` and every other rank a :class:`NullLogger` with the same
methods, so the training loop has no ``if rank == 0`` around its logging.

wandb is optional at every level: ``logger.kind=none`` never imports it; ``logger.mode=auto`` runs online only
when the user is logged in (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``) and offline
otherwise (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later); an explicit ``WANDB_MODE`` in the
environment wins over ``auto``. Any wandb failure, at start or mid-run, warns once and switches wandb off for
the rest of the run: a dashboard never stops training.

Names (:func:`run_names`, applied by ``train.py``): a sweep's runs share a group named by what is the same for all
of them (the experiment preset, then the fixed overrides) and each is named by what varies (``pos=rope,seed=1``);
runs are tagged with their scheme and preset. Training and evaluation runs keep ``pos``, ``seed``, ``model`` and
``trainer`` at the same config paths, so one workspace groups both by ``pos.name``; an evaluation run logs one
history row per evaluation length (``eval/length`` is its x-axis), so a line plot overlays the schemes. The
retrieval probes (eval.probes) join those rows (``eval/passkey/key_top1``, a mean over depths), or, placed by a
distance, get rows of their own on the ``eval/distance`` axis (``eval/copy/top1``); a task checkpoint's exact match
gets a row per length bin on the ``eval/task_length`` axis (``eval/task/copy/exact_match``), in the task's unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import netrc
import os
import secrets
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from roformer.files import atomic_write, one_line

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
    # runs compared together; None: set by train.py from the overrides (see run_names), an eval run: its
    # checkpoint's training group
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    # None: set by train.py, a sweep job's varying overrides (e.g. "pos=rope,seed=0"), a single run's overrides
    name: str | None = None
    mode: WandbMode = WandbMode.auto

    def __post_init__(self) -> None:
        self.kind = LoggerKind(self.kind)
        self.mode = WandbMode(self.mode)

# x-axes of the dashboard: train/* and val/* are plotted against the optimizer step (and can be switched to
# tokens seen in the UI)
STEP_METRIC, TOKENS_METRIC = "trainer/step", "trainer/tokens"
METRICS_FILE = "metrics.jsonl"  # in the run folder: one JSON row per logged dict, rank 0


def cut_metrics(run_dir: Path, step: int) -> int:
    """Drop the rows of ``<run_dir>/metrics.jsonl`` logged after ``step`` (a run resumed at ``step`` logs the steps
    it redoes again) and a last line cut short by a kill; the kept rows are written atomically. Returns how many
    rows were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    text = path.read_text()
    lines, kept = text.splitlines(), []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the half-written row of a killed process
            continue
        if row.get(STEP_METRIC, 0) <= step:
            kept.append(line + "\n")
    if len(kept) < len(lines) or (kept and not text.endswith("\n")):
        atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


def new_run_id() -> str:
    """A wandb-compatible run id, chosen by us so a checkpoint can carry it before wandb starts."""
    return secrets.token_hex(4)


# wandb's server refuses group and run names over 128 characters; its client refuses tags over 64
MAX_NAME, MAX_TAG = 128, 64
NO_FIXED_OVERRIDES = "defaults"  # the group of a sweep that fixes nothing and has no preset


@dataclass(frozen=True)
class RunNames:
    group: str
    name: str | None
    tags: list[str]


def _fit(text: str, limit: int) -> str:
    """``text``, or its head and a hash of all of it when it is longer than ``limit`` (still unique)."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _override_key(override: str) -> str:
    """``+trainer.x@pkg=1`` -> ``trainer.x``: the key Hydra's override_dirname.exclude_keys are matched against."""
    return override.partition("=")[0].lstrip("+~").partition("@")[0]


def run_names(overrides: list[str], swept: set[str] | None, *, experiment: str | None, scheme: str,
              exclude: Iterable[str] = (), tags: Iterable[str] = ()) -> RunNames:
    """A run's wandb group, name and tags from its command-line overrides.

    ``overrides``: this job's ``key=value`` overrides (Hydra's ``hydra.overrides.task``); ``swept``: the keys that
    take several values over the sweep, or None for a single run; ``exclude``: keys kept out of names (Hydra's
    ``override_dirname.exclude_keys``: paths and such; ``logger.*`` always); ``experiment``: the preset,
    ``scheme``: pos.name.

    * a sweep: group = the preset's name, then the fixed overrides (``pos_sweep``, ``debug=fast``,
      ``extrapolation,trainer.max_steps=900``; ``defaults`` when there are neither); name = the swept ones
      (``pos=rope,seed=1``), sorted as in Hydra's job folder names;
    * a single run: group = the preset's name, else the scheme (its seeds side by side); name = its overrides,
      None without any (wandb then makes one up);
    * tags: ``tags``, then the scheme and the preset.
    """
    exclude = set(exclude)
    kept = sorted(o for o in overrides  # the dashboard's own settings never name a run
                  if _override_key(o) not in exclude and _override_key(o).partition(".")[0] != "logger")
    if swept is None:
        group, name = experiment or scheme, ",".join(kept) or None
    else:
        fixed = [o for o in kept if _override_key(o) not in swept and _override_key(o) != "experiment"]
        head = [experiment] if experiment and "experiment" not in swept else []
        group = ",".join(head + fixed) or NO_FIXED_OVERRIDES
        name = ",".join(sorted(o for o in overrides if _override_key(o) in swept)) or None
    all_tags = [_fit(t, MAX_TAG) for t in [*tags, scheme, *([experiment] if experiment else [])]]
    return RunNames(_fit(group, MAX_NAME), name and _fit(name, MAX_NAME), list(dict.fromkeys(all_tags)))


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
        self.metrics_path = self.run_dir / METRICS_FILE
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
EVAL_TABLE_SKIP = {"label", "scheme", "seed", "train_len", "nll_sum", "bytes", "words", "note", "fine_tuned",
                   "init_from"}
# an evaluation run's x-axis, and the metrics of each (protocol, RoPE scaling) logged against it
EVAL_STEP = "eval/length"
EVAL_DISTANCE = "eval/distance"  # the copy probe's x-axis: tokens between the span and its repeat
# the algorithmic tasks' x-axis: a length bin's upper bound in the task's own unit (words, digits, pairs), not
# tokens, so an axis of its own
EVAL_TASK_STEP = "eval/task_length"
EVAL_METRICS = ("ppl", "ratio", "bits_per_byte", "word_ppl")


def eval_key(protocol: str, rope_scaling: str, metric: str) -> str:
    """``eval/nonoverlapping/ppl``; a RoPE scaling method adds its name: ``eval/nonoverlapping/ntk/ppl``.

    Scaling methods are keys of the checkpoint's run, not runs of their own, so that a chart grouped by
    ``pos.name`` pools exactly one run per seed of each scheme."""
    return f"eval/{protocol}/{metric}" if rope_scaling == "none" else f"eval/{protocol}/{rope_scaling}/{metric}"


def eval_history(rows: list[dict], probes: list[dict] = ()) -> list[dict]:
    """One checkpoint's result rows -> one wandb history row per length, shortest first: ``eval/length``,
    ``eval/length_multiple`` (length / training length) and every scored metric under :func:`eval_key`; the
    probes scored by length (passkey) add theirs, a mean over depths: ``eval/passkey/key_top1``.
    Cells that were not scored (``n/a``, ``skipped``) leave their keys out; a length with none is left out."""
    by_length: dict[int, dict] = {}

    def at(L: int, train_len: int) -> dict:
        return by_length.setdefault(L, {EVAL_STEP: L, "eval/length_multiple": L / train_len})

    for r in rows:
        if r["status"] != "ok":
            continue
        row = at(r["length"], r["train_len"])
        for m in EVAL_METRICS:
            v = r.get(m)
            if v is not None and math.isfinite(v):
                row[eval_key(r["protocol"], r["rope_scaling"], m)] = float(v)
    for (L, probe, scaling, metric), (v, train_len) in probe_means(probes, "length").items():
        at(L, train_len)[eval_key(probe, scaling, metric)] = v
    return [by_length[L] for L in sorted(by_length)]


def probe_means(probes: list[dict], axis: str) -> dict[tuple, tuple[float, int]]:
    """(length or distance, probe, RoPE scaling, metric) -> (mean over depths, training length), for the scored
    probe rows placed by ``axis`` (``length``: passkey; ``distance``: copy)."""
    values = defaultdict(list)
    for r in probes:
        if r["status"] == "ok" and r.get(axis) is not None and math.isfinite(r["value"]):
            values[(r[axis], r["probe"], r["rope_scaling"], r["metric"], r["train_len"])].append(r["value"])
    return {key[:-1]: (float(sum(v) / len(v)), key[-1]) for key, v in values.items()}


def distance_history(probes: list[dict]) -> list[dict]:
    """The probes placed by distance (copy) -> one wandb history row per distance, ``eval/distance`` its x-axis."""
    by_distance: dict[int, dict] = {}
    for (d, probe, scaling, metric), (v, train_len) in sorted(probe_means(probes, "distance").items()):
        row = by_distance.setdefault(d, {EVAL_DISTANCE: d, "eval/distance_multiple": d / train_len})
        row[eval_key(probe, scaling, metric)] = v
    return list(by_distance.values())


# what an evaluation run's config says of its checkpoint: where it is and its identity fields (eval_run.Identity),
# so a workspace groups evaluation runs by checkpoint.family, checkpoint.fine_tuned, ...
CHECKPOINT_KEYS = ("path", "label", "variant", "family", "attention", "step", "tokens_seen", "fine_tuned", "init_from",
                   "ft_method", "task")


def eval_run_config(ck: dict, settings: dict) -> dict:
    """An evaluation run's config: its checkpoint's training config at the training runs' paths (``pos``,
    ``seed``, ``model``, ``trainer``, ``data``, ``optim``), what was scored under ``eval`` and the checkpoint
    under ``checkpoint`` (its record's CHECKPOINT_KEYS that it has)."""
    train = {k: v for k, v in ck["config"]["train"].items() if k != "logger"}  # the training run's dashboard
    split = {k: ck[k] for k in ("split_tokens", "split_docs") if k in ck}  # a task checkpoint has no split
    return {**train, "model": ck["config"]["model"], "pos": ck["config"]["pos"],
            "eval": {**settings, "data": ck["data"], **split},
            "checkpoint": {k: ck[k] for k in CHECKPOINT_KEYS if k in ck}}


# the probe table's columns on the dashboard: the probe rows' fields less those of the checkpoint
PROBE_COLUMNS = ["variant", "rope_scaling", "probe", "metric", "length", "distance", "depth", "value", "n", "status",
                 "prompt_tokens", "chance"]


def probe_summary(probes: list[dict]) -> dict[str, float]:
    """The probes' summary keys, as ``eval/ppl@L``: ``eval/passkey_key_top1@512`` (a mean over depths),
    ``eval/copy_top1@128`` (at a distance); a RoPE scaling method adds ``/<method>``."""
    out = {}
    for axis in ("length", "distance"):
        for (x, probe, scaling, metric), (v, _) in probe_means(probes, axis).items():
            out[f"eval/{probe}_{metric}@{x}" + ("" if scaling == "none" else f"/{scaling}")] = v
    return out


def log_probe_summary(run, wandb, probes: list[dict]) -> None:
    """The probe rows as a table, and their summary keys (:func:`probe_summary`)."""
    run.log({"eval/probes": wandb.Table(columns=PROBE_COLUMNS, data=[[r.get(c) for c in PROBE_COLUMNS]
                                                                      for r in probes])})
    for k, v in probe_summary(probes).items():
        run.summary[k] = v


# the task table's columns on the dashboard: the task rows' fields less those of the checkpoint
TASK_COLUMNS = ["variant", "task", "metric", "bin_lo", "bin_hi", "length", "value", "n", "n_correct", "max_tokens"]


def task_history(tasks: list[dict]) -> list[dict]:
    """One checkpoint's task rows -> one wandb history row per length bin, by its upper bound: ``eval/task_length``,
    ``eval/task_length_multiple`` (the bound / the training length) and ``eval/task/<task>/<metric>``
    (``eval/task/copy/exact_match``). Bins that were not scored (past a learned table) leave their keys out."""
    by_length: dict[int, dict] = {}
    for r in tasks:
        if r["value"] is None or not math.isfinite(r["value"]):
            continue
        L = r.get("length", r["bin_hi"])
        row = by_length.setdefault(L, {EVAL_TASK_STEP: L, "eval/task_length_multiple": L / r["train_len"]})
        row[f"eval/task/{r['task']}/{r['metric']}"] = float(r["value"])
    return [by_length[L] for L in sorted(by_length)]


def task_summary(tasks: list[dict]) -> dict[str, float]:
    """The tasks' summary keys, as ``eval/ppl@L``: ``eval/copy_exact_match@40`` (the bin 21..40)."""
    return {f"eval/{r['task']}_{r['metric']}@{r.get('length', r['bin_hi'])}": float(r["value"]) for r in tasks
            if r["value"] is not None}


def log_task_summary(run, wandb, tasks: list[dict]) -> None:
    """The task rows as a table, and their summary keys (:func:`task_summary`)."""
    run.log({"eval/tasks": wandb.Table(columns=TASK_COLUMNS, data=[[r.get(c) for c in TASK_COLUMNS] for r in tasks])})
    for k, v in task_summary(tasks).items():
        run.summary[k] = v


def log_evaluation(results: dict, cfg: LoggerConfig, out_dir: Path, columns: list[str]) -> None:
    """One ``eval`` run per checkpoint, in its training run's group: a row per length (per length bin: a task
    checkpoint), tables, eval/ppl@L.

    ``columns`` are the result files' (CSV) columns. A dashboard failure warns and never loses the result files.
    """
    if cfg.kind != LoggerKind.wandb or wandb_mode(cfg.mode) == "disabled":
        return
    try:
        import wandb  # optional: only with logger=wandb (see wandb_init)

        for ck in results["checkpoints"]:
            rows = [r for r in results["results"] if r["label"] == ck["label"]]
            probes = [r for r in results.get("probes") or [] if r["label"] == ck["label"]]
            tasks = [r for r in results.get("tasks") or [] if r["label"] == ck["label"]]
            trained = ck["config"]["train"].get("logger") or {}
            tags = list(dict.fromkeys([*cfg.tags, *(trained.get("tags") or []), ck["scheme"]]))
            run = wandb_init(cfg, wandb_mode(cfg.mode), out_dir, group=cfg.group or ck.get("group"), job_type="eval",
                             name=cfg.name or f"{trained.get('name') or ck['label']} eval", tags=tags,
                             reinit="finish_previous", config=eval_run_config(ck, results["settings"]))
            run.define_metric(EVAL_STEP)
            for protocol in dict.fromkeys(r["protocol"] for r in rows):
                run.define_metric(f"eval/{protocol}/*", step_metric=EVAL_STEP)
            run.define_metric("eval/length_multiple", step_metric=EVAL_STEP)
            if any(r.get("distance") is not None for r in probes):
                run.define_metric(EVAL_DISTANCE)
                run.define_metric("eval/distance_multiple", step_metric=EVAL_DISTANCE)
            for probe in dict.fromkeys(r["probe"] for r in probes):  # passkey by length, copy by distance
                by_distance = any(r.get("distance") is not None for r in probes if r["probe"] == probe)
                run.define_metric(f"eval/{probe}/*", step_metric=EVAL_DISTANCE if by_distance else EVAL_STEP)
            if tasks:  # by bin, in the task's unit
                run.define_metric(EVAL_TASK_STEP)
                run.define_metric("eval/task/*", step_metric=EVAL_TASK_STEP)
                run.define_metric("eval/task_length_multiple", step_metric=EVAL_TASK_STEP)
            for row in eval_history(rows, probes) + distance_history(probes) + task_history(tasks):
                run.log(row)
            if probes:
                log_probe_summary(run, wandb, probes)
            if tasks:
                log_task_summary(run, wandb, tasks)
            if rows:  # a task checkpoint has no perplexity cells
                cols = [c for c in columns if c not in EVAL_TABLE_SKIP]
                table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
                ok = [r for r in rows if r["status"] == "ok" and r["protocol"] == "nonoverlapping"]
                line = wandb.Table(columns=["length", "ppl", "series"],
                                   data=[[r["length"], r["ppl"], f"{r['variant']}"] for r in ok])
                run.log({"eval/results": table,
                         "eval/ppl_vs_length": wandb.plot.line(line, "length", "ppl", stroke="series",
                                                               title="perplexity vs evaluation length")})
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
