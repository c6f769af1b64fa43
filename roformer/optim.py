"""Optimisation: the optim node of configs/train.yaml (``OptimConfig``), AdamW's parameter groups, the learning-rate
schedule, and how an optimizer loaded from a checkpoint takes this run's settings.

AdamW with decoupled weight decay on the 2-D weight matrices (linear layers and the token embedding, which is tied
to the LM head) and none on norms, biases and positional parameters (learned, relative and T5 tables: decaying
them pulls far positions to zero). Linear warmup over ``optim.warmup_steps``, then cosine decay to
``optim.lr x optim.min_lr_ratio`` at ``trainer.max_steps`` (or a constant lr); the training loop clips the global
gradient norm to ``optim.grad_clip``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from roformer.model import TransformerLM


class Schedule(str, Enum):
    cosine = "cosine"  # linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
    constant = "constant"  # linear warmup, then constant


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


def set_hyperparameters(opt: torch.optim.Optimizer, sched, o: OptimConfig, max_steps: int) -> None:
    """This run's optim.* and trainer.max_steps on an optimizer and schedule loaded from a checkpoint, and the lr
    of the next update recomputed from them. Without an override the values are the checkpoint's own (a resume
    refuses any other optim.*), so this changes nothing but a longer max_steps' decay."""
    sched.lr_lambdas[0] = LRSchedule(o.warmup_steps, max_steps, o.min_lr_ratio, o.schedule)
    sched.base_lrs = [o.lr] * len(opt.param_groups)
    lr = o.lr * sched.lr_lambdas[0](sched.last_epoch)
    for group, decay in zip(opt.param_groups, (o.weight_decay, 0.0), strict=True):  # as param_groups() made them
        group.update(lr=lr, initial_lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=decay)


def build_optimizer(model: TransformerLM, o: OptimConfig, max_steps: int, device: torch.device):
    """AdamW over :func:`param_groups` and its LambdaLR schedule to ``max_steps``."""
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=device.type in ("cuda", "cpu"))  # fused: one kernel per step, on CPU too
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRSchedule(o.warmup_steps, max_steps, o.min_lr_ratio, o.schedule))
    return opt, sched
