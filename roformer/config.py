"""Hydra's face: the run schemas registered with the ConfigStore, and DictConfig -> plain dataclasses, once.

Each schema lives beside the code that reads it: ``ModelConfig`` in model.py, ``PosConfig`` in positional.py,
``DataConfig`` in data/config.py, ``LoggerConfig`` in logger.py, ``OptimConfig`` in optim.py, ``TrainerConfig``
and the whole run's ``TrainConfig`` in train_config.py, ``EvalSettings`` in evaluation.py and evaluate.py's
``EvalConfig`` in eval_run.py. This module only composes them for Hydra and is imported by the entry points alone.

Validation happens in two layers. Types and allowed values come from the dataclasses:
Hydra rejects an unknown key, a wrong type or a value outside an Enum while composing, before any work. Rules
that span fields live in ``__post_init__`` and run when :func:`to_config` turns the composed ``DictConfig``
into plain dataclasses, once, at the entry point.

Resolvers ask the positional registry: ``${schemes:}`` lists the schemes and ``${reads:NAME}`` a scheme's options
(help pages), and a preset that every scheme trains with sets one scheme's option with ``${if_read:KEY,VALUE}``
(:func:`if_read`). ``${task_steps:${data.task}}`` is an algorithmic task's training steps (:func:`task_steps`).

``configs/train.yaml`` lists ``train_schema`` first in its defaults, so every group option (``model/``,
``pos/``, ``data/``, ``optim/``, ``logger/``, ...) is merged into this typed tree; ``configs/evaluate.yaml``
does the same with ``eval_schema``.

How an entry point ends (:func:`launch` around its ``@hydra.main`` function, :class:`Task` around that function's
body): exit 0 when done; 2 for a usage error, before any work (Hydra refused the command line: an unknown key, a
wrong type, a value outside an Enum, an unknown group option; or the typed config refused a value, a combination or
a missing required key); 1 for a failure while running (data, disk, a refused resume, divergence, rendezvous); 130
or 143 after a stop signal (:mod:`roformer.signals`). Our errors are one line on stderr, ``error: ...``, without a
traceback. A failed call leaves the run folder as it found it when it wrote nothing there but Hydra's own files: a
folder Hydra made for it is removed (with the parents made for it, when empty), and in an existing one Hydra's
``.hydra/*.yaml`` and the job log (``train.log``; Hydra appends to it) are put back. :class:`RunFolderGuard`, a
Hydra callback (configs/hydra/default.yaml), takes that :class:`RunFolder` snapshot after composing, before Hydra
writes into the folder. A sweep keeps Hydra's behaviour: a failed job is logged and recorded, the others run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from roformer.data import tasks as task_specs
from roformer.eval_run import EvalConfig
from roformer.files import atomic_write, check_creatable, first_line
from roformer.positional import DEFAULTS, SCHEMES
from roformer.train_config import TrainConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
EXIT_FAILURE, EXIT_USAGE = 1, 2

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def schemes(kind: str = "") -> str:
    """``${schemes:}``: the registered positional schemes, sorted, for help pages; ``${schemes:linear}``: those that
    linear attention can use."""
    if kind not in ("", "linear"):
        raise ValueError(f"${{schemes:{kind}}}: give nothing (every scheme) or linear")
    return ", ".join(sorted(n for n, c in SCHEMES.items() if not kind or c.supports_linear))


def reads(name: str) -> str:
    """``${reads:NAME}``: the pos.* options scheme NAME reads, for help pages."""
    read = sorted(SCHEMES[name].options) if name in SCHEMES else []
    return ", ".join(f"pos.{k}" for k in read) if read else "no pos.* option besides pos.name"


def if_read(key: str, value, _parent_):
    """``pos.KEY: ${if_read:KEY,VALUE}`` in a preset that every scheme trains with: VALUE where the selected scheme
    reads pos.KEY, else the key's default (which it does not read either), so that the preset does not give the
    other schemes an option they would be refused for (:meth:`PosConfig.check_options`)."""
    if key not in DEFAULTS:
        raise ValueError(f"${{if_read:{key},...}}: {key} is not a pos.* option; choose from {sorted(DEFAULTS)}")
    if not isinstance(_parent_, DictConfig) or "name" not in _parent_:
        raise ValueError(f"${{if_read:{key},{value}}} is for pos.* keys only (pos.{key}: ${{if_read:{key},{value}}})")
    scheme = SCHEMES.get(_parent_.name)  # an unknown name is refused with the choices when PosConfig is made
    return value if scheme is None or key in scheme.options else DEFAULTS[key]


def task_steps(task: str) -> int:
    """``trainer.max_steps: ${task_steps:${data.task}}`` (configs/data_preset/task.yaml): the steps in which the tiny
    model learns the task (:attr:`roformer.data.tasks.Task.default_steps`). An unknown name gets the common default
    here; DataConfig then refuses it with the choices."""
    spec = task_specs.TASKS.get(task)
    return task_specs.Task.default_steps if spec is None else spec.default_steps


OmegaConf.register_new_resolver("schemes", schemes, replace=True)
OmegaConf.register_new_resolver("reads", reads, replace=True)
OmegaConf.register_new_resolver("if_read", if_read, replace=True)
OmegaConf.register_new_resolver("task_steps", task_steps, replace=True)


def _to_object(cfg: DictConfig, want: type):
    """The composed config without its ``hydra`` node -> the schema's dataclasses (cross-field checks run here)."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, want):
        raise TypeError(f"expected a config composed from {want.__name__}'s schema, got {type(obj).__name__}")
    return obj


def to_config(cfg: DictConfig) -> TrainConfig:
    """The composed configs/train.yaml -> typed dataclasses."""
    return _to_object(cfg, TrainConfig)


def to_eval_config(cfg: DictConfig) -> EvalConfig:
    """The composed configs/evaluate.yaml -> typed dataclasses."""
    return _to_object(cfg, EvalConfig)


def check_output_dir(argv: list[str]) -> None:
    """Refuse, in one line, an explicit ``hydra.run.dir``/``hydra.sweep.dir`` that cannot be created (Hydra would
    make it first and fail with a traceback). Creates nothing. Exits 1."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value or "${" in value:
            continue
        try:
            check_creatable(value, key)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


def typed(overrides) -> list[str]:
    """Hydra's list of override strings as typed: an override's ``${...}`` (``pos.max_len=${if_read:max_len,32}``)
    stays unresolved, as it must (iterating the ListConfig would resolve it against that list, not the config)."""
    return [str(o) for o in OmegaConf.to_container(overrides, resolve=False)]


def swept_keys(hc: DictConfig) -> set[str]:
    """The keys that take several values in this job's sweep. A job's own overrides hold one value of each, so
    they are read from ``multirun.yaml``, the sweep's config that Hydra's sweeper writes into the sweep folder
    before it launches a job: there for in-process (basic launcher) and pickled (submitit) jobs alike. Without it
    (another sweeper), the sweeper's ``params`` alone."""
    path = Path(hc.sweep.dir) / "multirun.yaml"
    sweep = OmegaConf.load(path).hydra if path.exists() else None
    params = (hc if sweep is None else sweep).sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    lines = [f"{k}={v}" for k, v in params.items()] + ([] if sweep is None else typed(sweep.overrides.task))
    last = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(lines)}  # as the sweeper: last wins
    return {k for k, o in last.items() if o.is_sweep_override()}


# ----------------------------------------------------------------------------------------------------------
# How an entry point ends: exit codes, one-line errors, no run folder left that a failed call made for nothing


class UsageError(ValueError):
    """The composed config was refused while it became the typed dataclasses (exit 2)."""


def _tree(root: Path) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """Every file (and link) under ``root`` -> (size, mtime in ns), and every folder, as relative paths."""
    files, dirs = {}, set()
    for top, subdirs, names in os.walk(root):
        rel = Path(top).relative_to(root)
        dirs.update(str(rel / d) for d in subdirs)
        for name in names + [d for d in subdirs if os.path.islink(os.path.join(top, d))]:
            st = os.lstat(os.path.join(top, name))
            files[str(rel / name)] = (st.st_size, st.st_mtime_ns)
    return files, dirs


@dataclass
class RunFolder:
    """A run folder as it was before Hydra wrote into it, to be put back by a call that fails having written
    nothing there but Hydra's own files (``hydra``: ``.hydra/*.yaml`` and the job log)."""

    path: Path
    created_from: Path | None  # the highest folder this call creates (the run folder or a parent); None: it existed
    hydra: tuple[str, ...]
    files: dict[str, tuple[int, int]]
    dirs: set[str]
    saved: dict[str, bytes]  # Hydra's config files as they were (the job log only grows: its size is enough)

    @classmethod
    def snapshot(cls, path: str | os.PathLike, hydra: tuple[str, ...]) -> RunFolder:
        path = Path(os.path.abspath(path))  # as Hydra makes hydra.runtime.output_dir
        created_from, existing = None, path
        while not existing.exists():
            created_from, existing = existing, existing.parent
        files, dirs = _tree(path) if created_from is None else ({}, set())
        saved = {rel: (path / rel).read_bytes() for rel in hydra if rel in files and rel.endswith(".yaml")}
        return cls(path, created_from, hydra, files, dirs, saved)

    def restore(self) -> bool:
        """Put the folder back if this call wrote nothing there but Hydra's files (else keep what it wrote);
        returns whether it did."""
        files, dirs = _tree(self.path)
        ours = [{k: v for k, v in m.items() if k not in self.hydra} for m in (files, self.files)]
        if ours[0] != ours[1]:
            return False
        if self.created_from is not None:
            shutil.rmtree(self.path)
            parent = self.path.parent
            while parent.is_relative_to(self.created_from):  # the parents made for it, while empty
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
            return True
        for rel in self.hydra:
            path = self.path / rel
            if rel not in self.files:
                path.unlink(missing_ok=True)
                continue
            size, mtime = self.files[rel]
            if rel in self.saved:
                atomic_write(path, self.saved[rel])
            else:
                os.truncate(path, size)
            os.utime(path, ns=(mtime, mtime))
        for rel in sorted(dirs - self.dirs, key=len, reverse=True):  # folders made since, now empty
            try:
                (self.path / rel).rmdir()
            except OSError:
                pass
        return True


@dataclass
class _Call:
    """What this process's entry-point call has reached."""

    composed: bool = False  # Hydra composed the command line: a later exit 1 is not its refusal
    folder: RunFolder | None = None  # the run folder before Hydra wrote into it (single runs)


_CALL = _Call()


class RunFolderGuard(Callback):
    """Hydra callback (configs/hydra/default.yaml): notes that the command line composed and, for a single run that
    writes Hydra's files, snapshots its folder before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        hc = config.hydra
        _CALL.composed = True
        if hc.output_subdir is not None:
            hydra = tuple(str(Path(hc.output_subdir) / f"{n}.yaml") for n in ("config", "hydra", "overrides"))
            _CALL.folder = RunFolder.snapshot(str(hc.run.dir), (*hydra, f"{hc.job.name}.log"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _CALL.composed = True


def launch(main: Callable[[], object], argv: list[str] | None = None) -> None:
    """Run an entry point: ``main`` is its ``@hydra.main`` function, its body inside a :class:`Task`.

    An output folder that cannot be created is refused first (exit 1, a disk matter). Hydra prints a composition
    error and exits 1 before the task starts: that exit becomes 2, a usage error."""
    check_output_dir(sys.argv[1:] if argv is None else argv)
    _CALL.composed, _CALL.folder = False, None
    try:
        main()
    except SystemExit as e:
        if e.code == EXIT_FAILURE and not _CALL.composed:
            raise SystemExit(EXIT_USAGE) from None
        raise


class Task:
    """The body of an entry point's ``@hydra.main`` function: one-line errors, exit codes, the run folder put back.

        with Task(failures=(ValueError, OSError)) as task:
            cfg = task.config(dcfg, to_config)   # refused: "error: <message>", exit 2
            ...                                  # an exception in failures: "error: <message>", exit 1

    Any other exception keeps its traceback (Hydra prints it and exits 1). After a failure, or any non-zero exit
    from the block (a stop signal's 130/143), the run folder is put back when nothing but Hydra's files was written
    (:class:`RunFolder`). In a sweep a failure is logged and re-raised: the launcher records it and runs the rest.
    """

    def __init__(self, failures: tuple[type[BaseException], ...] = (ValueError, OSError)):
        self.failures, self.multirun = failures, False

    def __enter__(self) -> Task:
        _CALL.composed = True
        self.multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        return self

    def config(self, cfg: DictConfig, convert: Callable[[DictConfig], T]) -> T:
        """``convert(cfg)``; a ValueError or OmegaConf error (a bad value, a missing required key) is a usage error."""
        try:
            return convert(cfg)
        except (ValueError, OmegaConfBaseException) as e:
            raise UsageError(first_line(e)) from e

    def __exit__(self, kind, e, tb) -> bool:
        if kind is None or isinstance(e, SystemExit) and e.code in (0, None):
            return False
        code = EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE if isinstance(e, self.failures) else None
        if self.multirun:
            if code is not None:
                log.error("job %s failed: %s", HydraConfig.get().job.override_dirname, e)
            return False
        _restore_run_folder()
        if code is None:
            return False
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def _restore_run_folder() -> None:
    """This call's run folder put back (:meth:`RunFolder.restore`), if Hydra's callback snapshotted it."""
    folder, _CALL.folder = _CALL.folder, None
    if folder is None or not HydraConfig.initialized():
        return
    if folder.path != Path(os.path.abspath(HydraConfig.get().runtime.output_dir)):  # another call's (in-process)
        return
    try:
        folder.restore()
    except OSError as e:
        log.warning("could not put the run folder %s back as it was: %s", folder.path, e)
