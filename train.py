"""Train a language model with a pluggable positional scheme.

    python train.py                                             # RoPE, CPU-sized model, WikiText-2, ~10 min
    python train.py pos=alibi seed=1 trainer.max_steps=2000
    python train.py debug=fast                                  # a tiny model for a few steps, in seconds
    python train.py -m pos=rope,sinusoidal,learned,alibi,nope seed=0,1,2
    python train.py hydra.run.dir=outputs/r1 trainer.resume=auto  # continue a killed run
    torchrun --nproc_per_node=2 train.py trainer.batch_size=8   # DDP (gloo on CPU, NCCL on CUDA)

Configs: configs/train.yaml and its groups; schemas beside their code, composed in roformer/config.py;
loop: roformer/training.py.
A run folder holds train.log, metrics.jsonl, .hydra/ (the composed config), wandb/ and checkpoints/{last,best}.pt.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from roformer.config import check_output_dir, to_config
from roformer.training import TrainingDiverged, train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        tc = to_config(cfg)
        if multirun:  # one wandb group per sweep, one run per job named by its overrides
            tc.logger.group = tc.logger.group or Path(hc.sweep.dir).name
            tc.logger.name = tc.logger.name or hc.job.override_dirname or f"job{hc.job.num}"
        return train(tc, Path(hc.runtime.output_dir))
    except (ValueError, TrainingDiverged) as e:
        if multirun:  # the basic launcher records the failure and runs the other jobs
            log.error("job %s failed: %s", hc.job.override_dirname, e)
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    check_output_dir(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun: only rank 0 writes Hydra's outputs; the others learn rank 0's run folder from it
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    main()
