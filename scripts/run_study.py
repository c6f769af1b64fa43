"""Train short, test long: train every positional scheme, evaluate all checkpoints, write one report.

    python scripts/run_study.py                      # CPU preset: every scheme and variant x 3 seeds
    python scripts/run_study.py --preset zoo         # the schemes of 2022-2024 beside five classics, ~90 min
    python scripts/run_study.py --preset quick       # one seed, fewer lengths, < 20 min
    python scripts/run_study.py --preset gpu         # GPT-2 small at L = 512 on WikiText-103 (GPU, internet)
    python scripts/run_study.py --preset generalization   # every scheme x 3 seeds x 5 algorithmic tasks, 2 at once
    python scripts/run_study.py --out studies/mine --seeds 0,1 -- optim.lr=1e-3   # extra overrides for every run

The study is data: configs/run_study.yaml, composed with Hydra's compose API and checked before any work.
Variants: one per registered positional scheme (roformer.positional.SCHEMES, the options of configs/pos/; trained
with pos=<name>, in the file's pos_order, then any other by name), then the ones it names (rope+linear: RoPE with
linear attention), all with
the preset's shape, data and token budget. A preset, configs/study/<preset>.yaml (cpu, quick, gpu), names the
experiment every run trains (configs/experiment/), the seeds, and evaluate.py's eval.* settings; a task preset
(generalization) also names the algorithmic tasks every variant trains on (data.task=<task>, run folders
task=<task>,...; task_overrides: a task's own train.py overrides) and how many runs train at once (jobs, each with
CPUs // jobs threads and its own log). Each run goes to <out>/runs/<overrides> (a run that already has its last
checkpoint is not trained again, so rerunning continues a study). Then evaluate.py scores every checkpoint
with the three protocols at the preset's lengths, plus PI, NTK, dynamic NTK and YaRN on the RoPE checkpoints, and
<out>/eval holds results.{json,csv,md}, the plots and report.md (scripts/study_report.py: ratio tables with
mean ± std, the ALiBi paper's ratios beside ours, fixed-target against nonoverlapping). <out>/study.json records the
command, commit, machine and wall times.
wandb: one group per scheme, <study>-<variant> (its seeds side by side, or averaged with a band in wandb's
grouped view), each checkpoint's eval run in its training run's group, and every run tagged with the study's
name (the folder's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

import roformer.config  # noqa: E402,F401  (registers train.yaml's schema, which experiment_seq_len composes)
from roformer.data.tasks import TASK_NAMES  # noqa: E402
from roformer.evaluation import EvalSettings  # noqa: E402
from roformer.files import atomic_write, one_line  # noqa: E402
from roformer.positional import SCHEMES  # noqa: E402
from roformer.study_report import write_report  # noqa: E402


def options(group: str) -> list[str]:
    """The options of a config group, configs/<group>/*.yaml, by name."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def hydra_value(value: Any) -> str:
    """A YAML value as Hydra's command line writes it: true/false, [a,b,c], numbers and words as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


@dataclass
class Preset:
    """One option of configs/study/: what every run trains and how the checkpoints are scored."""

    # configs/experiment/<experiment>.yaml: the shape, data and token budget of every run
    experiment: str
    # the default --seeds
    seeds: list[int]
    # evaluate.py's eval.* settings (configs/evaluate.yaml), passed in this order; None: not passed
    eval: dict[str, Any]
    # name -> train.py overrides: this preset's own variants, instead of configs/run_study.yaml's (None)
    variants: dict[str, list[str]] | None = None
    # a study folder whose runs this one starts from: {base} in a variant's overrides
    base: str = ""
    # variants of configs/run_study.yaml whose runs in the base study are scored too (zero-shot, as trained)
    zero_shot: list[str] = field(default_factory=list)
    # algorithmic tasks (roformer/data/tasks.py): every variant is trained on each, with data.task=<task>; empty:
    # the experiment's own corpus
    tasks: list[str] = field(default_factory=list)
    # task -> train.py overrides of that task's runs only (a task that needs more steps than the others)
    task_overrides: dict[str, list[str]] = field(default_factory=dict)
    # the registered schemes only, without configs/run_study.yaml's named variants (rope+linear, learned-32L, ...)
    schemes_only: bool = False
    # training runs at once, each with trainer.threads = CPUs // jobs; 1: one after another
    jobs: int = 1

    def __post_init__(self) -> None:
        if self.experiment not in options("experiment"):
            raise ValueError(f"experiment={self.experiment} is not in configs/experiment/; "
                             f"choose from {options('experiment')}")
        if not self.seeds:
            raise ValueError("seeds is empty; list at least one")
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"tasks: {unknown} are not tasks; choose from {list(TASK_NAMES)}")
        stray = [t for t in self.task_overrides if t not in self.tasks]
        if stray:
            raise ValueError(f"task_overrides: {stray} are not in this preset's tasks {self.tasks}; "
                             "override only a task the study trains")
        if self.jobs < 1:
            raise ValueError(f"jobs={self.jobs}: run at least 1 training run at once")
        try:  # a wrong key, type or value fails now, not after hours of training
            settings = {k: v for k, v in self.eval.items() if v is not None}
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalSettings), settings))
        except (ValueError, OmegaConfBaseException) as e:
            raise ValueError(f"eval: {one_line(e)}") from None

    def eval_overrides(self) -> list[str]:
        return [f"eval.{k}={hydra_value(v)}" for k, v in self.eval.items() if v is not None]


@dataclass
class Study:
    """configs/run_study.yaml composed with one preset."""

    preset: Preset
    # variant name -> train.py overrides, in the order runs are trained and reported
    variants: dict[str, list[str]]
    # configs/run_study.yaml's variants (the base study's runs), when the preset brings its own
    main_variants: dict[str, list[str]]
    # the experiment's training length: {kL} in an override is k times it
    seq_len: int

    def overrides(self, variant: str, seed: int, base: Path | None) -> list[str]:
        """A variant's train.py overrides for one seed: {seed}, {base} (the base study folder) and {kL} filled in."""
        return [expand(o, seed=seed, base=base, seq_len=self.seq_len) for o in self.variants[variant]]

    def run_name(self, variant: str, seed: int, task: str | None = None) -> str:
        """A run's folder under <out>/runs: its overrides, as Hydra names a sweep's jobs; a preset's own variants
        (whose overrides hold paths) by name; a task's run starts with task=<task>."""
        head = f"task={task}," if task else ""
        if self.preset.variants is None:
            return head + run_name(self.overrides(variant, seed, None), seed)
        return f"{head}variant={variant},seed={seed}"


PLACEHOLDER = re.compile(r"\{(\d+(?:\.\d+)?)L\}")


def expand(override: str, *, seed: int, base: Path | None, seq_len: int) -> str:
    """{seed} -> the seed, {base} -> the base study folder, {kL} -> k x the training length (an integer)."""
    if "{base}" in override:
        if base is None:
            raise ValueError(f"{override!r} names {{base}} but the preset sets no base study; set base: FOLDER")
        override = override.replace("{base}", str(base))

    def times_len(m: re.Match) -> str:
        n = float(m.group(1)) * seq_len
        if n != int(n):
            raise ValueError(f"{override!r}: {m.group(1)} x {seq_len} tokens is not a whole number")
        return str(int(n))

    return PLACEHOLDER.sub(times_len, override.replace("{seed}", str(seed)))


def study_variants(pos_order: list[str], named: dict[str, list[str]]) -> dict[str, list[str]]:
    """One variant per registered positional scheme (pos_order first, the others by name), then the named ones."""
    pos = sorted(SCHEMES)
    stale = [v for v in pos_order if v not in pos]
    if stale:
        raise ValueError(f"pos_order: {stale} are not positional schemes; choose from {pos}")
    variants = {v: [f"pos={v}"] for v in [*pos_order, *(v for v in pos if v not in pos_order)]}
    clash = [v for v in named if v in variants]
    if clash:
        raise ValueError(f"variants: {clash} already name positional schemes; choose other names")
    return variants | {str(v): [str(o) for o in overrides] for v, overrides in named.items()}


def load_study(preset: str) -> Study:
    """configs/run_study.yaml composed with study=<preset>, checked; a ValueError names the file and the key."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="run_study"):
            cfg = compose("run_study", overrides=[f"study={preset}"])
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        raise ValueError(f"configs/run_study.yaml with study={preset} does not compose: {one_line(e)}") from None
    try:
        p = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Preset), cfg.study))
    except (ValueError, OmegaConfBaseException) as e:
        raise ValueError(f"configs/study/{preset}.yaml: {one_line(e)}") from None
    try:
        variants = study_variants(list(cfg.pos_order), OmegaConf.to_container(cfg.variants))
    except ValueError as e:
        raise ValueError(f"configs/run_study.yaml: {e}") from None
    unknown = [v for v in p.zero_shot if v not in variants]
    if unknown:
        raise ValueError(f"configs/study/{preset}.yaml: zero_shot: {unknown} are not variants of "
                         f"configs/run_study.yaml; choose from {list(variants)}")
    own = {str(v): [str(o) for o in ov] for v, ov in p.variants.items()} if p.variants is not None else None
    if own is None and p.schemes_only:
        own = {v: o for v, o in variants.items() if v in SCHEMES}  # named by their overrides: pos=<name>
    return Study(preset=p, variants=own or variants, main_variants=variants, seq_len=experiment_seq_len(p.experiment))


def experiment_seq_len(experiment: str) -> int:
    """trainer.seq_len of train.py's config with experiment=<name>."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="run_study"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    return int(cfg.trainer.seq_len)


def run_name(overrides: list[str], seed: int) -> str:
    """A run's folder under <out>/runs: its overrides, as Hydra names a sweep's jobs."""
    return ",".join([*overrides, f"seed={seed}"])


def base_folder(study: Study) -> Path | None:
    return Path(study.preset.base).resolve() if study.preset.base else None


def zero_shot_runs(study: Study, seeds: list[int]) -> list[Path]:
    """The base study's run folders that are scored beside this study's runs (preset's zero_shot, every seed)."""
    base = base_folder(study)
    if base is None:
        return []
    return [base / "runs" / run_name(study.main_variants[v], seed) for seed in seeds for v in study.preset.zero_shot]


def check_base(study: Study, variants: list[str], seeds: list[int]) -> None:
    """Every checkpoint the study starts from or scores exists, before any work: a ValueError says what to run."""
    base = base_folder(study)
    wanted = list(zero_shot_runs(study, seeds))
    for seed in seeds:
        for v in variants:
            wanted += [Path(o.split("=", 1)[1].strip("'\"")) for o in study.overrides(v, seed, base)
                       if o.startswith("trainer.init_from=")]
    missing = [str(p) for p in dict.fromkeys(wanted) if not (p / "checkpoints" / "last.pt").is_file()
               and not p.is_file()]
    if missing:
        raise ValueError(f"the base study has no checkpoint at {missing[0]} ({len(missing)} missing); train it "
                         f"first: python scripts/run_study.py --out {base} --seeds {','.join(map(str, seeds))}")


def study_tag(study: Study) -> str:
    """The tag every run of the study carries beside the study's name: what kind of study it is."""
    return "tasks" if study.preset.tasks else "extrapolation"


def train_runs(
    study: Study, variants: list[str], seeds: list[int], out: Path, logger: str, extra: list[str],
    tasks: list[str] | None = None, threads: int = 0,
) -> list[tuple[str, Path, list[str]]]:
    """(name, run folder, train.py command) of every run, seed-major, then task by task: a study cut short still has
    every variant for the first seeds. ``tasks``: the algorithmic tasks each variant trains on (None: the preset's;
    empty: its corpus); ``threads``: trainer.threads of each run (0: the experiment's)."""
    group, tag = out.name, study_tag(study)
    tasks = study.preset.tasks if tasks is None else tasks
    runs = []
    for seed in seeds:
        for task in tasks or [None]:
            for v in variants:
                name = study.run_name(v, seed, task)
                run_dir = out / "runs" / name
                label = f"{task}-{v}" if task else v
                cmd = [
                    sys.executable,
                    "train.py",
                    f"experiment={study.preset.experiment}",
                    *study.overrides(v, seed, base_folder(study)),
                    *([f"data.task={task}", *study.preset.task_overrides.get(task, [])] if task else []),
                    f"seed={seed}",
                    f"logger={logger}",
                    f"logger.group={group}-{label}",
                    f"logger.tags=[{tag},{group}]",
                    f"logger.name={label}-seed{seed}",
                    "trainer.progress=false",
                    *([f"trainer.threads={threads}"] if threads else []),
                    *extra,
                    f"hydra.run.dir='{run_dir}'",
                ]
                runs.append((name, run_dir, cmd))
    return runs


def eval_command(study: Study, out: Path, logger: str, seeds: list[int]) -> list[str]:
    """evaluate.py over every checkpoint under <out>/runs (and the base study's zero-shot runs); each eval run goes
    to its checkpoint's training group."""
    ckpts = [out / "runs", *zero_shot_runs(study, seeds)]
    return [
        sys.executable,
        "evaluate.py",
        "ckpt=[" + ",".join(f"'{p}'" for p in ckpts) + "]",
        *study.preset.eval_overrides(),
        f"logger={logger}",
        f"logger.tags=[{study_tag(study)},{out.name}]",
        f"hydra.run.dir='{out / 'eval'}'",
    ]


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


def train_all(todo: list[tuple[str, list[str]]], jobs: int, log: Path, logs: Path) -> list[dict]:
    """Run the training commands, ``jobs`` at once (each then logs to <logs>/<name>.log instead of the study's
    log, so that their lines do not interleave); a record per run, in the given order."""

    def one(name: str, cmd: list[str]) -> dict:
        t = time.time()
        rc = sh(cmd, log if jobs == 1 else logs / f"{name}.log")
        if rc != 0:
            print(f"! {name} failed (exit {rc}); see {log if jobs == 1 else logs / f'{name}.log'}", flush=True)
        return {"run": name, "exit_code": rc, "seconds": round(time.time() - t, 1)}

    if jobs == 1:
        return [one(name, cmd) for name, cmd in todo]
    logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda run: one(*run), todo))


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
    ap.add_argument("--preset", choices=options("study"), default="cpu", help="configs/study/<preset>.yaml")
    ap.add_argument("--out", default="", help="study folder (default studies/<preset>)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: every variant, "
                    "configs/run_study.yaml)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the preset's algorithmic tasks")
    ap.add_argument("--jobs", type=int, default=None, help="training runs at once, each with CPUs // jobs threads "
                    "(default: the preset's jobs)")
    ap.add_argument("--logger", default="wandb", choices=["wandb", "none"])
    ap.add_argument("--skip-train", action="store_true", help="only evaluate what is in <out>/runs")
    ap.add_argument("--base", default=None, help="the base study folder a preset's runs start from (default: the "
                    "preset's base, e.g. studies/cpu for --preset extension)")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for every run (after --)")
    args = ap.parse_args()
    try:
        study = load_study(args.preset)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out or f"studies/{args.preset}").resolve()
    variants = list(study.variants) if args.variants is None else [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in study.variants]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(study.variants)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else study.preset.seeds
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2")
    tasks = study.preset.tasks if args.tasks is None else [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in study.preset.tasks]
    if unknown:
        ap.error(f"--tasks: {unknown} are not tasks of --preset {args.preset}; choose from {study.preset.tasks}")
    jobs = study.preset.jobs if args.jobs is None else args.jobs
    if jobs < 1:
        ap.error(f"--jobs {jobs}: run at least 1 training run at once")
    if args.base is not None:
        study.preset.base = args.base
    try:
        check_base(study, variants, seeds)
    except ValueError as e:
        ap.error(str(e))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    t0 = time.time()
    record = {
        "command": shlex.join(["python", *sys.argv]),  # as a reader reruns it: no path of this machine's venv
        "commit": git_commit(),
        "machine": machine(),
        "preset": args.preset,
        "seeds": seeds,
        "variants": variants,
        "tasks": tasks,
        "jobs": jobs,
        "runs": [],
    }
    if not args.skip_train:
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
        todo = []
        for name, run_dir, cmd in train_runs(study, variants, seeds, out, args.logger, args.overrides, tasks, threads):
            if (run_dir / "checkpoints" / "last.pt").is_file():
                print(f"= {name}: already trained", flush=True)
            else:
                todo.append((name, cmd))
        record["runs"] = train_all(todo, jobs, log, out / "logs")
    t_train = time.time() - t0
    rc = sh(eval_command(study, out, args.logger, seeds), log)
    record.update(
        train_seconds=round(t_train, 1),
        eval_seconds=round(time.time() - t0 - t_train, 1),
        wall_seconds=round(time.time() - t0, 1),
        eval_exit_code=rc,
    )
    atomic_write(out / "study.json", json.dumps(record, indent=1) + "\n")
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
