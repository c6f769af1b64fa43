"""Write a study's comparison report from its evaluation results, and optionally publish it.

    python scripts/study_report.py studies/cpu                              # -> studies/cpu/eval/report.md
    python scripts/study_report.py studies/cpu --publish docs/extrapolation  # also copy report, tables, plots

Reads <study>/eval/results.json and <study>/study.json (written by scripts/run_study.py) and writes report.md with
its plot, ppl_ratio.png (or, for the extension study, `--preset extension`, its own report and extension_ppl.png).
--publish copies report.md, results.md, results.csv, the plots and study.json into the folder given (small files
only: no checkpoints, no results.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roformer.extension_report import EXTENSION_PLOT  # noqa: E402
from roformer.files import atomic_write  # noqa: E402
from roformer.study_report import write_report  # noqa: E402
from roformer.task_report import PLOT as TASK_PLOT  # noqa: E402
from roformer.task_report import TASK_CSV  # noqa: E402

PUBLISHED = ("report.md", "results.md", "results.csv", "ppl_ratio.png", "ppl_vs_length.png", "ppl_ratio_vs_length.png",
             "per_position.png", EXTENSION_PLOT, TASK_PLOT, TASK_CSV)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="study folder (run_study.py --out)")
    ap.add_argument("--publish", type=Path, default=None, help="folder to copy the report, tables and plots into")
    args = ap.parse_args()
    try:
        report = write_report(args.study)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        sources = [args.study / "eval" / name for name in PUBLISHED] + [args.study / "study.json"]
        for src in sources:
            if src.is_file():
                atomic_write(args.publish / src.name, src.read_bytes())
        print(f"published to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
