"""Train short, test long: train every positional scheme, evaluate all checkpoints, write one report.

    python scripts/run_study.py                      # CPU preset: 8 variants x 3 seeds, < 90 min on 2 cores
    python scripts/run_study.py --preset quick       # one seed, fewer lengths, < 20 min
    python scripts/run_study.py --preset gpu         # GPT-2 small at L = 512 on WikiText-103 (GPU, internet)
    python scripts/run_study.py --out studies/mine --seeds 0,1 -- optim.lr=1e-3   # extra overrides for every run

Variants: rope, sinusoidal, learned, alibi, nope, relative, t5, and rope with linear attention, all with the
preset's shape, data and token budget. Each run goes to <out>/runs/<overrides> (a run that already has its
last checkpoint is not trained again, so rerunning continues a study). Then evaluate.py scores every
checkpoint with the three protocols at the preset's lengths, plus PI, NTK, dynamic NTK and YaRN on the RoPE
checkpoints, and <out>/eval holds results.{json,csv,md}, the plots and report.md (scripts/study_report.py: ratio
tables with mean ± std, the ALiBi paper's ratios beside ours, fixed-target against nonoverlapping).
<out>/study.json records the command, commit, machine and wall times. wandb: one group per scheme,
<study>-<variant> (its seeds side by side, or averaged with a band in wandb's grouped view), each checkpoint's eval
run in its training run's group, and every run tagged with the study's name (the folder's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from roformer.study_report import write_report  # noqa: E402

VARIANTS = {  # name -> overrides
    "rope": ["pos=rope"],
    "sinusoidal": ["pos=sinusoidal"],
    "learned": ["pos=learned"],
    "alibi": ["pos=alibi"],
    "nope": ["pos=nope"],
    "relative": ["pos=relative"],
    "t5": ["pos=t5"],
    "rope+linear": ["pos=rope", "model.attention=linear"],
}
PRESETS = {
    "cpu": dict(
        experiment="extrapolation",
        seeds=[0, 1, 2],
        multipliers=[1, 1.25, 1.5, 2, 4, 5, 8, 16, 24],
        eval=["eval.max_tokens=16384", "eval.max_docs=16", "eval.target_tokens=128", "eval.bf16=true"],
    ),
    "quick": dict(
        experiment="extrapolation_quick",
        seeds=[0],
        multipliers=[1, 2, 4, 8, 16],
        eval=["eval.max_tokens=8192", "eval.max_docs=8", "eval.target_tokens=128", "eval.bf16=true"],
    ),
    "gpu": dict(
        experiment="extrapolation_gpu",
        seeds=[0, 1, 2],
        multipliers=[1, 1.25, 1.5, 2, 4, 5, 8, 16, 24],
        eval=["eval.max_tokens=262144", "eval.target_tokens=256", "eval.bf16=true"],
    ),
}


def sh(cmd: list[str], log: Path) -> int:
    """Run a command, teeing its output to a log file; return its exit code."""
    print("$", shlex.join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if "error" in line.lower() or " - done:" in line or "cells scored" in line:
                print("  " + line.rstrip(), flush=True)
        return proc.wait()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", default="", help="study folder (default studies/<preset>)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--logger", default="wandb", choices=["wandb", "none"])
    ap.add_argument("--skip-train", action="store_true", help="only evaluate what is in <out>/runs")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for every run (after --)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    out = Path(args.out or f"studies/{args.preset}").resolve()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    group = out.name
    t0 = time.time()
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": git_commit(),
        "machine": machine(),
        "preset": args.preset,
        "seeds": seeds,
        "variants": variants,
        "runs": [],
    }
    if not args.skip_train:
        for seed in seeds:  # seed-major order: a study cut short still has every variant for the first seeds
            for v in variants:
                name = ",".join(VARIANTS[v] + [f"seed={seed}"])
                run_dir = out / "runs" / name
                if (run_dir / "checkpoints" / "last.pt").is_file():
                    print(f"= {name}: already trained", flush=True)
                    continue
                t = time.time()
                rc = sh(
                    [
                        sys.executable,
                        "train.py",
                        f"experiment={preset['experiment']}",
                        *VARIANTS[v],
                        f"seed={seed}",
                        f"logger={args.logger}",
                        f"logger.group={group}-{v}",
                        f"logger.tags=[extrapolation,{group}]",
                        f"logger.name={v}-seed{seed}",
                        "trainer.progress=false",
                        *args.overrides,
                        f"hydra.run.dir='{run_dir}'",
                    ],
                    log,
                )
                record["runs"].append({"run": name, "exit_code": rc, "seconds": round(time.time() - t, 1)})
                if rc != 0:
                    print(f"! {name} failed (exit {rc}); see {log}", flush=True)
    t_train = time.time() - t0
    mult = ",".join(str(m) for m in preset["multipliers"])
    rc = sh(
        [
            sys.executable,
            "evaluate.py",
            f"ckpt='{out / 'runs'}'",
            f"eval.multipliers=[{mult}]",
            "eval.rope_scaling=[none,pi,ntk,dynamic_ntk,yarn]",
            "eval.progress=false",
            *preset["eval"],
            f"logger={args.logger}",  # each eval run goes to its checkpoint's training group
            f"logger.tags=[extrapolation,{group}]",
            f"hydra.run.dir='{out / 'eval'}'",
        ],
        log,
    )
    record.update(
        train_seconds=round(t_train, 1),
        eval_seconds=round(time.time() - t0 - t_train, 1),
        wall_seconds=round(time.time() - t0, 1),
        eval_exit_code=rc,
    )
    (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    if rc == 0:
        write_report(out)
    print(
        f"study done in {record['wall_seconds'] / 60:.1f} min (train {t_train / 60:.1f}, eval "
        f"{record['eval_seconds'] / 60:.1f}); report: {out / 'eval' / 'report.md'}",
        flush=True,
    )
    return rc or int(any(r["exit_code"] for r in record["runs"]))


if __name__ == "__main__":
    sys.exit(main())
