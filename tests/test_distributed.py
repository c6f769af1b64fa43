"""Ranks from torchrun or SLURM: host-list expansion, which variables win, the port, a rendezvous that gives up
in one line, and (slow) two processes given only SLURM's variables training exactly as torchrun's two."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, read_metrics

from roformer import checkpoint as ckpt_lib
from roformer.runtime import (
    SLURM_PORTS,
    DistEnv,
    RendezvousError,
    _stderr_held,
    dist_env,
    expand_hostlist,
    join_process_group,
    rendezvous_timeout,
    slurm_port,
)

CLI = ["debug=fast", "trainer.progress=false", "trainer.precision=fp32", "trainer.log_interval=1",
       "trainer.max_steps=8", "trainer.eval_interval=4", "trainer.seq_len=32", "trainer.batch_size=4"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def slurm_vars(procid: int, ntasks: int, job_id: int, nodelist: str = "localhost") -> dict[str, str]:
    """What srun sets in each task, as far as ranks go."""
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(procid),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": str(job_id)}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "ROFORMER_DIST"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def free_job_id(start: int) -> int:
    """A SLURM job id whose derived port nothing on this machine holds."""
    for job in range(start, start + 1000):
        with socket.socket() as s:
            try:
                s.bind(("", slurm_port(job)))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port in SLURM_PORTS")


# ----------------------------------------------------------------------------------------------------------
# the rules


@pytest.mark.parametrize("spec, hosts", [
    ("localhost", ["localhost"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-a100-[009-011],cpu4", ["gpu-a100-009", "gpu-a100-010", "gpu-a100-011", "cpu4"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("n[8-10]x", ["n8x", "n9x", "n10x"]),
])
def test_slurm_host_lists_expand_in_order(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "node[01", "node]1", "a,,b", "n[a-b]", "n[3-1]", "n[1-2"])
def test_a_malformed_host_list_is_named(spec):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST="):
        expand_hostlist(spec)


def test_torchrun_variables_win_over_slurm():
    env = {**slurm_vars(3, 8, 77), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "29500"}
    assert dist_env(env) == DistEnv(1, 2, 1, "h0", 29500, "torchrun")
    assert dist_env({**slurm_vars(3, 8, 77), "WORLD_SIZE": "1", "RANK": "0"}).world_size == 1  # torchrun -n 1


def test_slurm_variables_fill_in_when_torchrun_is_absent():
    env = {**slurm_vars(5, 8, 123456, "gpu[07-08]"), "SLURM_LOCALID": "1"}
    assert dist_env(env) == DistEnv(5, 8, 1, "gpu07", slurm_port(123456), "slurm")
    # the step's nodes, when srun ran on part of the job's; MASTER_ADDR/MASTER_PORT win when set
    assert dist_env({**env, "SLURM_STEP_NODELIST": "gpu08"}).master_addr == "gpu08"
    assert dist_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}).master_addr == "10.0.0.1"
    assert dist_env({**env, "MASTER_PORT": "23456"}).master_port == 23456


@pytest.mark.parametrize("env", [
    {},
    slurm_vars(0, 1, 9),  # srun -n 1, or a batch script of one task
    {"SLURM_NTASKS": "4", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"},  # an salloc shell: not a task
    {"RANK": "0", "WORLD_SIZE": "1"},
])
def test_one_task_is_a_plain_process(env):
    got = dist_env(env)
    assert (got.rank, got.world_size, got.local_rank) == (0, 1, 0)


@pytest.mark.parametrize("env, message", [
    ({**slurm_vars(2, 2, 9)}, "SLURM_PROCID=2 with world size 2"),
    ({**slurm_vars(0, 2, 9), "SLURM_PROCID": "x"}, "SLURM_PROCID='x': expected an integer"),
    ({k: v for k, v in slurm_vars(1, 2, 9).items() if k != "SLURM_JOB_NODELIST"}, "set SLURM_JOB_NODELIST"),
    ({k: v for k, v in slurm_vars(1, 2, 9).items() if k != "SLURM_JOB_ID"}, "and SLURM_JOB_ID"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "set MASTER_ADDR and MASTER_PORT"),
])
def test_an_unusable_environment_is_one_line_naming_the_variable(env, message):
    with pytest.raises(ValueError, match=message) as e:
        dist_env(env)
    assert "\n" not in str(e.value)


def test_the_port_is_the_jobs_own_and_outside_the_ephemeral_range():
    lo, hi = SLURM_PORTS
    ports = [slurm_port(j) for j in range(4_000_000, 4_000_064)]  # a sweep's array jobs on one node
    assert len(set(ports)) == len(ports) and all(lo <= p < hi <= 32768 for p in ports)
    assert slurm_port(4_000_000) == slurm_port(4_000_000)
    assert all(lo <= slurm_port(j) < hi for j in (0, 1, 2**31 - 1, 10**12))


def test_the_rendezvous_timeout_comes_from_its_variable():
    assert rendezvous_timeout({}) == 300
    assert rendezvous_timeout({"ROFORMER_DIST_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(ValueError, match="ROFORMER_DIST_TIMEOUT="):
            rendezvous_timeout({"ROFORMER_DIST_TIMEOUT": bad})


def test_a_rank_alone_gives_up_after_the_timeout_with_a_value_error(monkeypatch, capfd):
    monkeypatch.setenv("ROFORMER_DIST_TIMEOUT", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    env = DistEnv(1, 2, 1, "127.0.0.1", slurm_port(free_job_id(4_100_000)), "slurm")  # nobody hosts the store
    t = time.monotonic()
    with pytest.raises(RendezvousError, match=r"rank 1 of 2 \(SLURM_PROCID/SLURM_NTASKS\) did not meet") as e:
        join_process_group(env, torch.device("cpu"))
    assert time.monotonic() - t < 15 and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert "ROFORMER_DIST_TIMEOUT=1 s" in str(e.value) and "srun started all 2 tasks" in str(e.value)
    assert capfd.readouterr().err == ""  # torch's retry logs (with C++ stack traces) are held back


def test_what_torch_writes_during_a_good_rendezvous_still_reaches_stderr(capfd):
    with _stderr_held():
        os.write(2, b"kept\n")
    assert capfd.readouterr().err == "kept\n"


# ----------------------------------------------------------------------------------------------------------
# the real CLI


def test_a_missing_task_stops_the_live_ones_in_one_line(text_corpus, tmp_path):
    """SLURM_NTASKS=2 with one task started: rank 0 waits for a peer that never comes, rank 1 (in another job) for
    a store nobody hosts. Each exits 1 after ROFORMER_DIST_TIMEOUT with the one line and no traceback. Measured on
    2 shared cores: rank 0 ~6 s, rank 1 ~7 s for a 3 s timeout (TCPStore's client retries once after a pause)."""
    timeout = 3
    procs = []
    for rank, job in ((0, free_job_id(4_200_000)), (1, free_job_id(4_200_500))):
        env = clean_env(**slurm_vars(rank, 2, job), ROFORMER_DIST_TIMEOUT=str(timeout))
        cmd = [sys.executable, str(REPO / "train.py"), *CLI, *text_corpus, f"hydra.run.dir={tmp_path}/run{rank}"]
        procs.append((rank, time.monotonic(), subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True,
                                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for rank, start, p in procs:
        out, err = p.communicate(timeout=120)
        elapsed = time.monotonic() - start
        assert p.returncode == 1, err[-2000:]
        assert elapsed < 3 * timeout + 20, elapsed
        assert "Traceback" not in out + err and "frame #" not in err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank} of 2 (SLURM_PROCID/SLURM_NTASKS)")
        assert "ROFORMER_DIST_TIMEOUT=3 s" in lines[0] and "srun started all 2 tasks" in lines[0]


@pytest.mark.slow
def test_two_slurm_tasks_train_exactly_as_two_torchrun_ranks(text_corpus, tmp_path):
    """Two processes given only SLURM_* (as srun starts them) against ``torchrun --nproc_per_node=2`` of the same
    config: the same losses (fp32, gloo: the same all-reduce of the same gradients; measured identical), one run
    folder, and rank 1 writes nothing in its working folder."""
    common = [str(REPO / "train.py"), *CLI, *text_corpus]
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         *common, f"hydra.run.dir={tmp_path}/torchrun"], cwd=REPO, env=clean_env(),
                        capture_output=True, text=True, timeout=300)
    assert tr.returncode == 0, tr.stderr[-2000:]

    job = free_job_id(4_300_000)
    cwd = [tmp_path / "cwd0", tmp_path / "cwd1"]
    procs = []
    for rank in (0, 1):
        cwd[rank].mkdir()
        procs.append(subprocess.Popen([sys.executable, *common, f"hydra.run.dir={tmp_path}/slurm"], cwd=cwd[rank],
                                      env=clean_env(**slurm_vars(rank, 2, job, "127.0.0.1")), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]

    a, b = read_metrics(tmp_path / "torchrun"), read_metrics(tmp_path / "slurm")
    assert [r["trainer/step"] for r in a] == [r["trainer/step"] for r in b] and len(a) >= 8
    for ra, rb in zip(a, b, strict=True):
        for k in ("train/loss", "val/loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=0), (ra["trainer/step"], k)
    assert ckpt_lib.load_checkpoint(tmp_path / "slurm")["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd0", "cwd1", "slurm", "torchrun"]  # one run folder
    assert list(cwd[1].iterdir()) == []  # rank 1 wrote nothing (Hydra's outputs are rank 0's)
