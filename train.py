"""Train one RoFormer-style language model with a pluggable positional scheme.

    python train.py                                             # RoPE, CPU-sized model, WikiText-2
    python train.py pos=alibi seed=1 trainer.max_steps=2000
    python train.py debug=fast                                  # a tiny model for a few steps, in seconds, no wandb
    python train.py -m pos=rope,sinusoidal,learned,alibi,nope seed=0,1,2   # a sweep: one wandb group
    python train.py -m experiment=pos_sweep                     # every scheme x 3 seeds
    python train.py hydra.run.dir=outputs/r1 trainer.resume=auto  # continue a killed run exactly
    torchrun --nproc_per_node=2 train.py trainer.batch_size=8   # DDP: global batch 8 x 2 x grad_accum

``python train.py --help`` prints these with the config groups and main keys (configs/hydra/help/train.yaml);
``--cfg job`` prints every key. Configs: configs/train.yaml and its groups; schemas beside their code, composed in
roformer/config.py; loop: roformer/training.py.
A run folder (outputs/<date>/<time>, or multirun/<date_time>/<overrides> in a sweep) holds train.log,
metrics.jsonl, .hydra/ (the composed config), wandb/ and checkpoints/{last,best}.pt.

Exit codes: 0 done; 2 a usage error (a bad override or value, a refused combination), before any work; 1 a failure
while running (data, disk, a refused resume, divergence, rendezvous); 130/143 a stop signal. A failed call leaves
no run folder it made for nothing, and an existing one as it was (roformer/config.py: launch, Task).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from roformer.config import Task, launch, swept_keys, to_config, typed
from roformer.logger import run_names
from roformer.runtime import dist_env
from roformer.signals import Interrupted, exit_interrupted, interrupt_message, resume_command
from roformer.training import TrainingDiverged, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # a bad value or combination: one line, exit 2; a failure while running: one line, exit 1 (a sweep: logged)
    with Task(failures=(ValueError, TrainingDiverged, OSError)) as task:
        tc = task.config(cfg, to_config)
        names = run_names(typed(hc.overrides.task), swept_keys(hc) if multirun else None,
                          experiment=hc.runtime.choices.get("experiment"), scheme=tc.pos.name,
                          exclude=list(hc.job.config.override_dirname.exclude_keys), tags=tc.logger.tags)
        # explicit logger.group / logger.name win; the checkpoint keeps these, so evaluation runs can join them
        tc.logger.group = tc.logger.group or names.group
        tc.logger.name = tc.logger.name or names.name
        tc.logger.tags = names.tags
        try:
            return train(tc, Path(hc.runtime.output_dir))
        except Interrupted as e:  # the step is checkpointed; one line says how to resume; exit 130/143
            exit_interrupted(e, _resume_line(e, hc) if e.rank == 0 else None)


def _resume_line(e: Interrupted, hc: DictConfig) -> str:
    """How to continue this run (a sweep job: as a single run in its own folder), with the overrides as given."""
    run_dir = Path(hc.runtime.output_dir)
    can_resume = (run_dir / "checkpoints" / "last.pt").exists()
    command = resume_command([*typed(hc.overrides.task), *typed(hc.overrides.hydra)], _near(run_dir), resume=can_resume,
                             launcher=[*_launcher(), _near(__file__)])
    return interrupt_message(e, command, can_resume=can_resume)


def _launcher() -> list[str]:
    """What started this process: python, or torchrun with as many processes (a resumed DDP run needs the same
    global batch), or srun inside a SLURM allocation."""
    env = dist_env()
    if env.world_size == 1:
        return ["python"]
    if env.source == "slurm":
        return ["srun", f"--ntasks={env.world_size}", "python"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    nodes = [f"--nnodes={env.world_size // local}"] if local < env.world_size else []
    return ["torchrun", *nodes, f"--nproc_per_node={local}"]


def _near(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder when it lies inside it, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


if __name__ == "__main__":
    try:
        rank = dist_env().rank  # the rank setup_runtime will use: torchrun's variables, else SLURM's
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank > 0:
        # torchrun or srun: only rank 0 writes Hydra's outputs; the others learn rank 0's run folder from it
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    launch(main)
