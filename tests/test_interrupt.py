"""Stop signals: the step is finished and checkpointed, one line says how to resume, the exit code is 130/143 and
no traceback is printed; the printed command resumes bit for bit; a second Ctrl-C aborts at once; the handlers
are train()'s only while it runs; under DDP the ranks stop after the same step; submitit's preemption signal
reaches its own requeue handler after our checkpoint; a SLURM restart resumes its own folder, nothing else does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, compose, read_metrics, tiny_config

import roformer.config  # noqa: F401  (registers the schemas that compose() reads)
from roformer import checkpoint as ckpt_lib
from roformer import training
from roformer.signals import (
    Interrupted,
    StopSignals,
    exit_interrupted,
    interrupt_message,
    preempt_signal,
    requeue_resume,
    resume_command,
    stop_signals,
)
from roformer.training import train

SINGLE = SimpleNamespace(distributed=False)  # what StopSignals.requested reads of a Runtime
# long enough to be signalled while it runs (about 100 steps/s here), short enough to finish in seconds
CLI = ["debug=fast", "trainer.progress=false", "trainer.seq_len=32", "trainer.batch_size=4", "trainer.precision=fp32",
       "trainer.deterministic=true", "trainer.log_interval=1", "trainer.max_steps=150", "trainer.eval_interval=100"]
LINE = re.compile(r"interrupted at step (\d+); resume with: (.+)")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(autouse=True)
def handlers_back():
    """Every test leaves the process's signal handlers as it found them (exit_interrupted ignores the signals)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
    saved = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(args: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """train.py in the background, its stdout and stderr in files (a pipe could fill and stall it)."""
    out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=out, stderr=err, env=_env())
    return proc, tmp / f"{name}.err"


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics, end = run / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the run ended before it could be signalled"
        if metrics.exists() and sum("train/loss" in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} steps logged in {timeout} s")


def _losses(run: Path) -> dict[int, float]:
    """train/loss by step; every step logged once."""
    rows = [(r["trainer/step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r]
    assert len({s for s, _ in rows}) == len(rows), "a step was logged twice"
    return dict(rows)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(text_corpus, tmp_path_factory):
    """The uninterrupted run: (train/loss by step, final checkpoint, best.pt)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run([sys.executable, "train.py", *CLI, *text_corpus, f"hydra.run.dir={run}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return _losses(run), ckpt_lib.load_checkpoint(run), ckpt_lib.load_checkpoint(run / "checkpoints/best.pt")


# ----------------------------------------------------------------------------------------------------------
# the CLI: real train.py processes


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       pytest.param(signal.SIGUSR1, 143, marks=pytest.mark.slow)])
def test_a_stop_signal_checkpoints_the_step_and_the_printed_command_resumes_exactly(sig, code, text_corpus,
                                                                                   reference, tmp_path):
    run = tmp_path / "run"
    proc, err = _start([*CLI, *text_corpus, f"hydra.run.dir={run}"], tmp_path, "first")
    _wait_for_steps(run, 5, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    stderr = err.read_text()
    assert "Traceback" not in stderr + (tmp_path / "first.out").read_text()
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith(("interrupted", "aborted"))]
    step, command = LINE.fullmatch(line).groups()
    step, command = int(step), shlex.split(command)
    assert 5 <= step < 100 and ckpt_lib.load_checkpoint(run)["step"] == step
    assert not (run / "checkpoints/best.pt").exists()  # not validated: an interrupt checkpoint is never best.pt
    assert command[:2] == ["python", "train.py"] and command[-2:] == [f"hydra.run.dir={run}", "trainer.resume=auto"]
    assert command[2:-2] == [*CLI, *text_corpus]  # the overrides as given

    r = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    losses, final, best = reference
    assert _losses(run) == losses  # every step, bit for bit (fp32), the resumed ones included
    assert _same_weights(ckpt_lib.load_checkpoint(run)["model"], final["model"])
    assert _same_weights(ckpt_lib.load_checkpoint(run / "checkpoints/best.pt")["model"], best["model"])


def test_a_second_ctrl_c_aborts_at_once_and_leaves_the_last_checkpoint_whole(text_corpus, tmp_path):
    run = tmp_path / "run"
    # steps of ~0.1 s, so the second signal lands inside the step the first one is waiting for
    proc, err = _start([*CLI, *text_corpus, "trainer.batch_size=64", "trainer.seq_len=64", "trainer.eval_interval=2",
                        f"hydra.run.dir={run}"], tmp_path, "run")
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert proc.wait(timeout=30) == 130
    assert time.monotonic() - sent < 5
    stderr = err.read_text()
    assert "Traceback" not in stderr + (tmp_path / "run.out").read_text()
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith(("interrupted", "aborted"))]
    # measured: the second lands inside the step ("aborted ..."); on a faster machine the first may have been
    # handled already, and the second is then ignored by a process that is exiting
    assert line.startswith("aborted by a second SIGINT without saving this step; resume from the last checkpoint "
                           "with: python train.py ") or LINE.fullmatch(line)
    assert ckpt_lib.load_checkpoint(run)["step"] >= 2
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# in process: the loop, the handlers, the messages


def test_an_interrupt_in_process_checkpoints_the_step_and_resumes_bit_for_bit(toy_data, tmp_path, monkeypatch):
    cfg = tiny_config("trainer.max_steps=12", "trainer.eval_interval=10")
    train(cfg, tmp_path / "whole", data=toy_data)
    step = training.train_step

    def signalled_at_7(tr, rt, t, grad_clip, p):
        out = step(tr, rt, t, grad_clip, p)
        if p.step + 1 == 7:
            signal.raise_signal(signal.SIGTERM)  # arrives during step 7: it is finished first
        return out

    monkeypatch.setattr(training, "train_step", signalled_at_7)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as e:
        train(cfg, tmp_path / "cut", data=toy_data)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are train()'s only while it runs
    assert (e.value.step, e.value.checkpoint, e.value.exit_code) == (7, tmp_path / "cut/checkpoints/last.pt", 143)
    ck = ckpt_lib.load_checkpoint(tmp_path / "cut")
    assert ck["step"] == 7 and ck["metrics"] == {} and ck["best_val_loss"] == float("inf")
    assert not (tmp_path / "cut/checkpoints/best.pt").exists()
    monkeypatch.setattr(training, "train_step", step)
    cfg.trainer.resume = "auto"
    train(cfg, tmp_path / "cut", data=toy_data)
    whole, cut = ckpt_lib.load_checkpoint(tmp_path / "whole"), ckpt_lib.load_checkpoint(tmp_path / "cut")
    assert _same_weights(whole["model"], cut["model"]) and whole["best_val_loss"] == cut["best_val_loss"]
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "cut")


def test_an_interrupt_before_the_first_step_saves_nothing(toy_data, tmp_path, monkeypatch):
    def prepare(*a, **k):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the data is prepared

    monkeypatch.setattr(training, "prepare", prepare)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started in the background
    with pytest.raises(Interrupted) as e:
        train(tiny_config(), tmp_path)
    assert e.value.checkpoint is None and not e.value.aborted and e.value.exit_code == 130
    assert not (tmp_path / "checkpoints/last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_the_first_signal_waits_for_the_step_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started in the background
    with StopSignals() as stop:
        stop.defer(rank=0)
        assert not stop.requested(SINGLE)
        signal.raise_signal(signal.SIGTERM)  # noted, not raised
        signal.raise_signal(signal.SIGTERM)  # the same request again (torchrun passes on what it gets): no abort
        signal.raise_signal(signal.SIGUSR1)
        assert stop.requested(SINGLE) and stop.agreed == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGINT)  # a person's second Ctrl-C
    assert e.value.aborted and e.value.checkpoint is None and e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_the_messages_name_the_step_and_the_command():
    cmd = "python train.py hydra.run.dir=RUN trainer.resume=auto"
    assert interrupt_message(Interrupted(signal.SIGINT, 42, Path("last.pt")), cmd, can_resume=True) == (
        f"interrupted at step 42; resume with: {cmd}")
    assert interrupt_message(Interrupted(signal.SIGTERM), "C", can_resume=False) == (
        "interrupted by SIGTERM before the first step; no checkpoint yet; start again with: C")
    assert interrupt_message(Interrupted(signal.SIGTERM), "C", can_resume=True) == (
        "interrupted by SIGTERM before the first step; resume from the last checkpoint with: C")
    assert interrupt_message(Interrupted(signal.SIGINT, aborted=True), "C", can_resume=True) == (
        "aborted by a second SIGINT without saving this step; resume from the last checkpoint with: C")


def test_resume_command_keeps_the_overrides_as_given_and_drops_the_sweep():
    given = ["pos=alibi", "data.train_files=[/d/doc*.txt]", "trainer.resume=old/run", "hydra.run.dir=old",
             "hydra.mode=MULTIRUN", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=m",
             "+trainer.resume=x", "hydra.job.chdir=false"]
    assert shlex.split(resume_command(given, "runs/a b")) == [
        "python", "train.py", "pos=alibi", "data.train_files=[/d/doc*.txt]", "hydra.job.chdir=false",
        "hydra.run.dir=runs/a b", "trainer.resume=auto"]
    # nothing in the folder to resume: the given trainer.resume stays (a fresh run starts fresh again)
    assert resume_command(["trainer.resume=old/run"], "r", resume=False) == (
        "python train.py trainer.resume=old/run hydra.run.dir=r")


def test_requeue_resume_only_for_a_slurm_restart_with_a_checkpoint(tmp_path):
    own = tmp_path / "last.pt"
    assert requeue_resume("", own, {"SLURM_RESTART_COUNT": "1"}) == "auto"  # requeued: continue its own folder
    assert requeue_resume("", own, {"SLURM_RESTART_COUNT": "3"}) == "auto"
    assert requeue_resume("", own, {}) == ""  # a fresh run in a folder with checkpoints starts fresh
    assert requeue_resume("", own, {"SLURM_RESTART_COUNT": "0"}) == ""  # first start of a SLURM job
    assert requeue_resume("", own, {"SLURM_RESTART_COUNT": ""}) == ""
    assert requeue_resume("", None, {"SLURM_RESTART_COUNT": "1"}) == ""  # requeued before its first checkpoint
    assert requeue_resume("other/run", own, {"SLURM_RESTART_COUNT": "1"}) == "other/run"  # what was asked wins
    assert requeue_resume("auto", None, {}) == "auto"


def test_a_restarted_slurm_job_resumes_its_own_folder(toy_data, tmp_path, monkeypatch):
    train(tiny_config("trainer.max_steps=10"), tmp_path, data=toy_data)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(tiny_config("trainer.max_steps=14"), tmp_path, data=toy_data)  # trainer.resume="" as submitted
    steps = [r["trainer/step"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, 15))  # 1-10, then 11-14: continued, not restarted
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    train(tiny_config("trainer.max_steps=3"), tmp_path, data=toy_data)  # outside a restart: fresh
    assert [r["trainer/step"] for r in read_metrics(tmp_path) if "train/loss" in r][14:] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# submitit: its preemption signal reaches our handler, then its own requeue


class _Job:
    """Stands in for hydra's submitit launcher: a callable whose checkpoint() resubmits it unchanged."""

    def __call__(self, *args):
        return args

    def checkpoint(self, *args):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args)


@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_submitits_signal_is_checkpointed_then_handed_to_submitits_requeue(cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from submitit.core.job_environment import JobEnvironment
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalJobEnvironment
    from submitit.slurm import slurm

    calls = []
    if cluster == "slurm":
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_PROCID", "0")
        monkeypatch.setattr(slurm.subprocess, "check_call", lambda cmd, **k: calls.append(cmd))  # no scontrol here
        env, code = slurm.SlurmJobEnvironment(), -1
    else:
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
        monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
        env, code = LocalJobEnvironment(), LOCAL_REQUEUE_RETURN_CODE
    delayed = submitit.helpers.DelayedSubmission(_Job(), "pos=rope")
    delayed.set_timeout(timeout_min=240, max_num_timeout=3)
    paths = submitit.core.utils.JobPaths(tmp_path, job_id="4242")
    env._handle_signals(paths, delayed)  # what submitit does when the job starts, before Hydra and train()
    theirs = signal.getsignal(JobEnvironment._usr_sig())
    assert JobEnvironment._usr_sig() == signal.SIGUSR2

    with StopSignals() as stop:
        stop.defer(rank=0)
        signal.raise_signal(signal.SIGUSR2)  # submitit's signal, signal_delay_s before the time limit
        assert stop.requested(SINGLE)  # ours caught it: the step ends and is checkpointed first
        e = stop.interrupted(SINGLE, 7, tmp_path / "last.pt")
    assert signal.getsignal(signal.SIGUSR2) is theirs and e.previous == theirs
    with pytest.raises(SystemExit) as done:
        exit_interrupted(e, None)
    assert done.value.code == code  # submitit's handler ran: it checkpointed the job and requeued it
    assert paths.submitted_pickle.exists()  # the resubmission launcher.checkpoint() returned
    assert calls == ([["scontrol", "requeue", "4242"]] if cluster == "slurm" else [])


def test_the_preemption_signal_is_the_one_submitit_uses(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preempt_signal() == signal.SIGUSR2
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # submitit's own setting, read by both
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def test_the_slurm_launcher_asks_for_the_signal_and_requeues_after_a_time_limit(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.slurm.slurm import _make_sbatch_string

    launcher = compose("hydra/launcher=slurm", return_hydra_config=True).hydra.launcher
    assert launcher.max_num_timeout >= 1  # 0: submitit gives up at the first time limit
    assert launcher.signal_delay_s >= 60  # a step and a checkpoint; SLURM may signal up to 60 s early
    sbatch = _make_sbatch_string(command="true", folder=tmp_path, signal_delay_s=launcher.signal_delay_s)
    assert f"#SBATCH --signal=USR2@{launcher.signal_delay_s}" in sbatch  # the signal our handlers catch


# ----------------------------------------------------------------------------------------------------------
# DDP: every rank stops after the same step


def _ranks_agree(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rt = SimpleNamespace(distributed=True, device=torch.device("cpu"))
    stopped = None
    with StopSignals() as stop:
        stop.defer(rank)
        for step in range(1, 20):
            if rank == 1 and step == 4:
                signal.raise_signal(signal.SIGTERM)  # only rank 1 is signalled
            if stop.requested(rt):
                stopped = (step, stop.agreed)
                break
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(stopped))


@pytest.mark.slow
def test_ranks_agree_to_stop_after_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ranks_agree, args=(2, 29531, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [[4, signal.SIGTERM], [4, signal.SIGTERM]]


def _descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _find(parent: int, needle: bytes, where: str) -> int:
    """The pid of the process under ``parent`` whose ``where`` (cmdline, environ) holds ``needle``."""
    for _ in range(600):
        for pid in _descendants(parent):
            with contextlib.suppress(OSError):
                if needle in b"\0" + Path(f"/proc/{pid}/{where}").read_bytes():
                    return pid
        time.sleep(0.05)
    raise AssertionError(f"no process under {parent} with {needle}")


@pytest.mark.slow
def test_a_signal_to_one_ddp_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(text_corpus, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    args = [*CLI, *text_corpus]
    ref = subprocess.run([*torchrun, "--master_port=29533", "train.py", *args, f"hydra.run.dir={tmp_path}/ref"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    err = open(tmp_path / "run.err", "w")
    proc = subprocess.Popen([*torchrun, "--master_port=29534", "train.py", *args, f"hydra.run.dir={run}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err, env=_env())
    _wait_for_steps(run, 5, proc)
    os.kill(_find(proc.pid, b"\0RANK=1\0", "environ"), signal.SIGTERM)  # rank 1 only; rank 0 learns it
    assert proc.wait(timeout=60) != 0  # torchrun reports its workers' 143
    (line,) = [ln for ln in (tmp_path / "run.err").read_text().splitlines() if ln.startswith("interrupted")]
    step, command = LINE.fullmatch(line).groups()
    command = shlex.split(command)
    ck = ckpt_lib.load_checkpoint(run)
    assert (ck["step"], ck["world_size"]) == (int(step), 2)
    assert command[:3] == ["torchrun", "--nproc_per_node=2", "train.py"]
    r = subprocess.run([*torchrun, "--master_port=29535", *command[2:]], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(run) == _losses(tmp_path / "ref")
    assert _same_weights(ckpt_lib.load_checkpoint(run)["model"], ckpt_lib.load_checkpoint(tmp_path / "ref")["model"])


# ----------------------------------------------------------------------------------------------------------
# the whole requeue, with submitit's local executor standing in for SLURM


@pytest.mark.slow
def test_a_timed_out_submitit_job_is_checkpointed_requeued_and_resumed_exactly(text_corpus, tmp_path):
    """hydra/launcher=submitit_local runs the job with submitit's own signal handling, as on SLURM. We send the
    job's task SIGUSR2 as submitit's controller does signal_delay_s before the time limit (waiting for the limit
    would tie the test to this machine's speed); submitit calls the launcher's checkpoint() and requeues (restarts)
    the job. SLURM_RESTART_COUNT=1 stands in for the count SLURM keeps (the local executor keeps none)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [*CLI, *text_corpus, "trainer.max_steps=300"]
    ref = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}/ref"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=_env())
    assert ref.returncode == 0, ref.stderr[-2000:]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "train.py", "-m", *args, "seed=0", "hydra/launcher=submitit_local",
                             "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**_env(), "SLURM_RESTART_COUNT": "1"})
    task = _find(proc.pid, b"submitit.core._submit", "cmdline")  # not its controller
    for _ in range(600):
        jobs = [p for p in sweep.glob("*") if (p / "metrics.jsonl").exists()]
        if jobs:
            break
        time.sleep(0.05)
    (job,) = jobs
    _wait_for_steps(job, 5, proc)
    os.kill(task, signal.SIGUSR2)
    assert proc.wait(timeout=300) == 0
    log_err = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    log_out = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    (stop,) = [int(m) for m in re.findall(r"^interrupted at step (\d+); resume with: ", log_err, re.M)]
    assert "Calling checkpoint method" in log_out and "Requeued job" in log_out  # submitit's handler, after ours
    assert re.search(rf"resumed from {re.escape(str(job))}/checkpoints/last.pt at step {stop}\b", log_out)
    assert _losses(job) == _losses(tmp_path / "ref")
    assert _same_weights(ckpt_lib.load_checkpoint(job)["model"], ckpt_lib.load_checkpoint(tmp_path / "ref")["model"])
