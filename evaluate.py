"""Perplexity of trained checkpoints at and beyond their training length.

    python evaluate.py ckpt=outputs/2026-01-01/12-00-00                       # a run folder (checkpoints/last.pt)
    python evaluate.py "ckpt=[runA/checkpoints/best.pt,runB]"                  # several checkpoints
    python evaluate.py ckpt=multirun/2026-01-01_12-00-00                       # every run of a sweep
    python evaluate.py ckpt=RUN eval.lengths=[256,512,1024,4096] eval.protocols=[nonoverlapping,sliding]
    python evaluate.py ckpt=RUN eval.rope_scaling=[none,pi,ntk,dynamic_ntk,yarn] eval.stride=128
    python evaluate.py ckpt=RUN data=sotu                                      # score another corpus
    python evaluate.py ckpt=RUN logger=none hydra.run.dir=outputs/eval1

``python evaluate.py --help`` prints these with the groups it accepts (data, logger) and the eval keys
(configs/hydra/help/evaluate.yaml); ``--cfg job`` prints every key.
Outputs in the run folder (default outputs/eval/<date>/<time>): results.json, results.csv, results.md,
ppl_vs_length.png, ppl_ratio_vs_length.png (ppl / ppl at the training length), per_position.png, evaluate.log.
Settings: configs/evaluate.yaml; schema: roformer/eval_run.py (EvalConfig) and roformer/evaluation.py (EvalSettings);
what runs: roformer/eval_run.py; scoring: roformer/evaluation.py; files: roformer/reporting.py.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from roformer.config import Task, launch, to_eval_config
from roformer.eval_run import run_evaluation
from roformer.reporting import scored_line, terminal_summary


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # a bad setting: one line, exit 2; our run-time errors (CheckpointError, DataError: ValueErrors) and the disk's:
    # one line, exit 1; a folder made for a failed call is removed
    with Task(failures=(ValueError, OSError)) as task:
        results = run_evaluation(task.config(cfg, to_eval_config), out_dir)
    print(terminal_summary(results))
    print(f"{scored_line(results)}; every protocol and metric: {out_dir / 'results.md'}")


if __name__ == "__main__":
    launch(main)
