"""Hydra's face: the run schemas registered with the ConfigStore, and DictConfig -> plain dataclasses, once.

Each schema lives beside the code that reads it: ``ModelConfig`` in model.py, ``PosConfig`` in positional.py,
``DataConfig`` in data/config.py, ``LoggerConfig`` in logger.py, ``OptimConfig``/``TrainerConfig`` and the
whole run's ``TrainConfig`` in training.py, ``EvalSettings`` in evaluation.py and evaluate.py's ``EvalConfig``
in eval_run.py. This module only composes them for Hydra and is imported by the entry points alone.

Validation happens in two layers. Types and allowed values come from the dataclasses:
Hydra rejects an unknown key, a wrong type or a value outside an Enum while composing, before any work. Rules
that span fields live in ``__post_init__`` and run when :func:`to_config` turns the composed ``DictConfig``
into plain dataclasses, once, at the entry point.

``configs/train.yaml`` lists ``train_schema`` first in its defaults, so every group option (``model/``,
``pos/``, ``data/``, ``optim/``, ``logger/``, ...) is merged into this typed tree; ``configs/evaluate.yaml``
does the same with ``eval_schema``.
"""

from __future__ import annotations

import sys

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from roformer.eval_run import EvalConfig
from roformer.files import check_creatable
from roformer.training import TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


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
