"""Resuming: a change to what defines the run is refused in one line that names the key, both values and the fix,
before any data work, and changes nothing in the run folder; trainer.resume_override accepts it and records it;
shapes the weights would not fit are refused even then; after a kill, metrics.jsonl holds each step once and the
leftovers of killed writes are gone; a full disk while checkpointing is one line, exit 1, and the run resumes."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, tiny_config

from roformer import checkpoint as ckpt_lib
from roformer.optim import Schedule, lr_factor
from roformer.resume import check_run
from roformer.training import train

# a run long enough to be killed while it runs (about 100 steps/s here), checkpointed every 20 steps, fp32: exact
CLI = ["debug=fast", "trainer.progress=false", "trainer.seq_len=32", "trainer.batch_size=4", "trainer.precision=fp32",
       "trainer.log_interval=1", "trainer.max_steps=150", "trainer.eval_interval=20", "trainer.keep_last=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (``.hydra/`` and train.log included), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the throughput (the one value a repeat does not reproduce)."""
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in read_metrics(run)]


@pytest.fixture(scope="module")
def base(toy_data, tmp_path_factory) -> Path:
    """A tiny run of 4 steps (checkpoints at 2 and 4): seed 0, batch 8, seq_len 32, rope, d_model 64."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config("trainer.max_steps=4", "trainer.eval_interval=2", "trainer.keep_last=3"), run, data=toy_data)
    return run


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the base run to resume."""
    return Path(shutil.copytree(base, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------
# what a resume may change


@pytest.mark.parametrize("override, key, saved, current", [
    ("seed=1", "seed", "0", "1"),
    ("model.dropout=0.1", "model.dropout", "0.0", "0.1"),
    ("model.activation=gelu_tanh", "model.activation", "gelu", "gelu_tanh"),
    ("pos.base=500", "pos.base", "10000.0", "500.0"),
    ("pos=alibi", "pos.name", "rope", "alibi"),
    ("data.split_seed=1", "data.split_seed", "0", "1"),
    ("trainer.seq_len=16", "trainer.seq_len", "32", "16"),
    ("trainer.batch_size=4", "trainer.batch_size", "8", "4"),
    ("trainer.grad_accum=2", "trainer.grad_accum", "1", "2"),
    ("optim.lr=0.003", "optim.lr", "0.01", "0.003"),
    ("optim.warmup_steps=5", "optim.warmup_steps", "2", "5"),
    ("optim.schedule=constant", "optim.schedule", "cosine", "constant"),
    ("optim.beta2=0.99", "optim.beta2", "0.95", "0.99"),
    ("optim.grad_clip=0.5", "optim.grad_clip", "1.0", "0.5"),
])
def test_each_run_defining_key_is_refused_in_one_line_before_any_work(override, key, saved, current, run, no_data):
    before = digest(run)
    with pytest.raises(ValueError) as e:
        train(tiny_config(override, "trainer.max_steps=6", "trainer.resume=auto"), run)
    assert str(e.value) == (f"cannot resume from {run}/checkpoints/last.pt: {key}={saved} in the checkpoint, "
                            f"{current} in this run; use {key}={saved}, or trainer.resume_override=[{key}] to change "
                            "it on purpose")
    assert digest(run) == before


@pytest.mark.parametrize("overrides, why", [
    (["model.d_model=32"], "blocks.0.attn.proj.weight is [64, 64] in the checkpoint, [32, 32] in this run, so the "
                           "weights would not load"),
    (["pos=learned"], "pos.table.weight is absent in the checkpoint, [1024, 64] in this run, so the weights would "
                      "not load"),
    (["model.tie_embeddings=false"], "the parameters would be tied or split otherwise, so the optimizer's state "
                                     "would not load"),
])
def test_what_the_weights_would_not_fit_is_refused_even_with_an_override(overrides, why, run, no_data):
    key = overrides[0].partition("=")[0].replace("pos", "pos.name")
    with pytest.raises(ValueError) as e:
        train(tiny_config(*overrides, f"trainer.resume_override=[{key}]", "trainer.resume=auto"), run)
    assert f"(no override can change it: {why}); use {key}=" in str(e.value)
    assert str(e.value).endswith(", or train a new model in another run folder")


def test_several_changes_are_named_in_one_line(run, no_data):
    with pytest.raises(ValueError) as e:
        train(tiny_config("seed=3", "model.d_model=32", "trainer.batch_size=4", "trainer.resume=auto"), run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot resume from {run}/checkpoints/last.pt: seed=0 in the "
                                              "checkpoint, 3 in this run; model.d_model=64 in the checkpoint, 32 ")
    assert msg.endswith("; use model.d_model=64; and seed=0 trainer.batch_size=8, or "
                        "trainer.resume_override=[seed,trainer.batch_size] to change them on purpose")


def test_the_same_global_batch_on_another_number_of_processes_needs_no_override(base):
    ck = ckpt_lib.load_checkpoint(base)  # batch_size 8 on 1 process
    assert check_run(ck, tiny_config("trainer.batch_size=4"), 2, base) == []  # 4 x 2: the same windows
    with pytest.raises(ValueError) as e:
        check_run(ck, tiny_config(), 2, base)
    assert ("trainer.batch_size x processes=8 x 1 in the checkpoint, 8 x 2 in this run; use trainer.batch_size=4, "
            "or trainer.resume_override=[trainer.batch_size]") in str(e.value)
    with pytest.raises(ValueError, match=r"use trainer.batch_size=8 on 1 process, or"):
        check_run(ck, tiny_config("trainer.batch_size=5"), 3, base)


def test_a_resume_compares_only_the_pos_options_the_scheme_reads(base):
    """A checkpoint keeps every pos.* key (older presets gave every scheme pos.max_len=128): the keys its scheme
    never read do not stop a resume, and one it reads still does."""
    ck = ckpt_lib.load_checkpoint(base)  # rope
    ck["pos_cfg"] = {**ck["pos_cfg"], "max_len": 128, "clip": 3, "num_buckets": 8}
    assert check_run(ck, tiny_config(), 1, base) == []
    with pytest.raises(ValueError, match=r": pos.base=10000.0 in the checkpoint, 500.0 in this run; use pos.base="):
        check_run(ck, tiny_config("pos.base=500"), 1, base)
    # another scheme: its name changes, and of the options only those both schemes read are compared
    cfg = tiny_config("pos=sinusoidal", "pos.base=500", "trainer.resume_override=[pos.name,pos.base]")
    changes = check_run(ck, cfg, 1, base)
    assert [c.key for c in changes] == ["pos.name", "pos.base"]


def test_overrides_are_accepted_logged_and_recorded_across_resumes(run, toy_data, caplog):
    cfg = tiny_config("seed=1", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.resume=auto",
                      "trainer.resume_override=[seed,trainer.batch_size]")
    with caplog.at_level(logging.WARNING, logger="roformer.resume"):
        train(cfg, run, data=toy_data)
    assert [r.getMessage() for r in caplog.records if r.name == "roformer.resume"] == [
        "trainer.resume_override: seed changes from 0 (checkpoint) to 1 at step 4",
        "trainer.resume_override: trainer.batch_size changes from 8 (checkpoint) to 4 at step 4"]
    ck = ckpt_lib.load_checkpoint(run)
    first = [{"step": 4, "key": "seed", "from": 0, "to": 1},
             {"step": 4, "key": "trainer.batch_size", "from": 8, "to": 4}]
    assert ck["step"] == 6 and ck["resume_overrides"] == first and ck["train_cfg"]["seed"] == 1
    assert ck["sampler"]["seed"] == 1 and ck["sampler"]["step"] == 6  # the new seed's windows, counted on
    assert ck["tokens_seen"] == 4 * 8 * 32 + 2 * 4 * 32

    # a later resume keeps the record and adds its own (a longer window: the sampler keeps its stream)
    train(tiny_config("seed=1", "trainer.batch_size=4", "trainer.seq_len=48", "model.dropout=0.1",
                      "trainer.max_steps=8", "trainer.resume=auto",
                      "trainer.resume_override=[model.dropout,trainer.seq_len]"), run, data=toy_data)
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["step"] == 8 and ck["resume_overrides"] == [
        *first, {"step": 6, "key": "model.dropout", "from": 0.0, "to": 0.1},
        {"step": 6, "key": "trainer.seq_len", "from": 32, "to": 48}]
    steps = [r["trainer/step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == list(range(1, 9))


def _lrs(run: Path) -> dict[int, float]:
    return {r["trainer/step"]: r["train/lr"] for r in read_metrics(run) if "train/lr" in r}


def test_an_optim_override_applies_from_the_resumed_step_and_keeps_adams_moments(run, toy_data):
    """optim.lr, optim.weight_decay and optim.beta2 overridden at step 4 of a 2-step-warmup cosine run extended to
    8 steps: every later update uses the new values and the schedule of the new lr and max_steps, while AdamW's
    moments and step count carry on from the checkpoint."""
    before = ckpt_lib.load_checkpoint(run)["optimizer"]["state"]
    train(tiny_config("optim.lr=0.003", "optim.weight_decay=0.5", "optim.beta2=0.99", "trainer.max_steps=8",
                      "trainer.resume=auto", "trainer.resume_override=[optim.lr,optim.weight_decay,optim.beta2]"),
          run, data=toy_data)
    ck = ckpt_lib.load_checkpoint(run)
    lrs = _lrs(run)
    factor = lambda step, max_steps: lr_factor(step, warmup=2, max_steps=max_steps, min_ratio=0.1,  # noqa: E731
                                               schedule=Schedule.cosine)
    assert [lrs[s] for s in range(1, 5)] == pytest.approx([0.01 * factor(s - 1, 4) for s in range(1, 5)])
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([0.003 * factor(s - 1, 8) for s in range(5, 9)])
    decay, no_decay = ck["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.99) and decay["initial_lr"] == 0.003
    assert ck["scheduler"]["base_lrs"] == [0.003, 0.003]
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {8.0}  # 4 + 4 steps: not restarted
    assert {float(st["step"]) for st in before.values()} == {4.0}
    assert [(c["key"], c["from"], c["to"]) for c in ck["resume_overrides"]] == [
        ("optim.lr", 0.01, 0.003), ("optim.weight_decay", 0.1, 0.5), ("optim.beta2", 0.95, 0.99)]


def test_a_longer_run_decays_over_the_new_length_from_the_first_resumed_update(run, toy_data):
    train(tiny_config("trainer.max_steps=8", "trainer.resume=auto"), run, data=toy_data)
    factor = lambda step: lr_factor(step, warmup=2, max_steps=8, min_ratio=0.1, schedule=Schedule.cosine)  # noqa: E731
    assert [_lrs(run)[s] for s in range(5, 9)] == pytest.approx([0.01 * factor(s - 1) for s in range(5, 9)])


def test_a_tokenizer_change_cannot_be_overridden(run, toy_data_other_tokenizer):
    other = toy_data_other_tokenizer
    with pytest.raises(ValueError) as e:
        train(tiny_config("data.split_seed=1", "trainer.resume_override=[data.split_seed]", "trainer.resume=auto"),
              run, data=other)
    assert str(e.value) == (f"cannot resume from {run}/checkpoints/last.pt: its tokenizer is not this run's data's "
                            "(vocab 64 in the checkpoint, 32 in this run); no override can change it (the weights "
                            "hold a row per token): use the checkpoint's data.* settings")


# ----------------------------------------------------------------------------------------------------------
# the run folder of a resumed run


def test_a_resume_logs_each_step_once_even_after_a_half_written_row(toy_data, tmp_path):
    """A kill at step 6 with the last checkpoint at 4 and a row cut in half: the resumed run's metrics.jsonl is the
    uninterrupted run's, row for row."""
    over = ["trainer.max_steps=8", "trainer.eval_interval=4", "trainer.keep_last=3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(tiny_config(*over), straight, data=toy_data)
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints/step_000004.pt", cut / "checkpoints/last.pt")
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    killed = [ln for ln in lines if json.loads(ln)["trainer/step"] <= 6]  # steps 5 and 6 done, not checkpointed
    (cut / "metrics.jsonl").write_text("\n".join(killed) + "\n" + lines[len(killed)][:25])  # step 7, cut short
    train(tiny_config(*over, "trainer.resume=auto"), cut, data=toy_data)
    assert _rows(cut) == _rows(straight) and len(_rows(cut)) == 8 + 2  # 8 train rows, val at 4 and 8


def test_leftovers_of_killed_writes_go_at_start_but_a_refused_resume_keeps_them(run, toy_data, no_data):
    left = [run / "checkpoints/.step_000006.pt.k1ll3d.tmp", run / ".metrics.jsonl.k1ll3d.tmp"]
    for p in left:
        p.write_bytes(b"half a file")
    with pytest.raises(ValueError, match="seed=0 in the checkpoint"):
        train(tiny_config("seed=1", "trainer.max_steps=6", "trainer.resume=auto"), run)
    assert all(p.exists() for p in left)  # a refusal changes nothing
    train(tiny_config("trainer.max_steps=6", "trainer.resume=auto"), run, data=toy_data)
    assert not any(p.exists() for p in left)
    assert not list(run.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# the CLI: real train.py processes


@pytest.mark.slow  # real CLI processes, 13-27 s: CI's slow step runs it
def test_a_killed_run_resumed_logs_every_step_once(text_corpus, tmp_path):
    ref = _run([*CLI, *text_corpus, f"hydra.run.dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *CLI, *text_corpus, f"hydra.run.dir={run}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:  # past the checkpoint at step 20
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count('"train/loss"') >= 25:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()  # SIGKILL: no handler runs, nothing is saved
    assert proc.wait(timeout=30) == -signal.SIGKILL
    logged = max(r["trainer/step"] for r in read_metrics(run))
    assert logged > ckpt_lib.load_checkpoint(run)["step"]  # steps after the last checkpoint were logged ...
    r = _run([*CLI, *text_corpus, f"hydra.run.dir={run}", "trainer.resume=auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(run)
    assert len(rows) == 150 + 8  # ... and are logged once: 150 train rows, val at 20, 40, ..., 140 and 150
    assert len({(r["trainer/step"], "val/loss" in r) for r in rows}) == len(rows)
    assert rows == _rows(tmp_path / "ref")  # the uninterrupted run's rows, bit for bit (fp32)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow  # real CLI processes, 13-27 s: CI's slow step runs it
def test_a_refused_resume_changes_nothing_and_an_override_is_recorded_in_train_log(text_corpus, tmp_path):
    run = tmp_path / "run"
    common = [*CLI, *text_corpus, "trainer.max_steps=6", "trainer.eval_interval=3", f"hydra.run.dir={run}"]
    assert _run(common).returncode == 0
    before = digest(run)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "checkpoints/last.pt"} <= set(before)

    r = _run([*common, "seed=1", "trainer.max_steps=9", "trainer.resume=auto"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"error: cannot resume from {run}/checkpoints/last.pt: seed=0 in the checkpoint, "
                                     "1 in this run; use seed=0, or trainer.resume_override=[seed] to change it on "
                                     "purpose"]
    assert digest(run) == before  # .hydra/ and train.log included: Hydra's writes are put back

    r = _run([*common, "seed=1", "trainer.max_steps=9", "trainer.resume=auto", "trainer.resume_override=[seed]"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainer.resume_override: seed changes from 0 (checkpoint) to 1 at step 6" in (run / "train.log").read_text()
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["step"] == 9 and ck["resume_overrides"] == [{"step": 6, "key": "seed", "from": 0, "to": 1}]


@pytest.fixture
def hydra_in_process():
    """train.py's main() in this process: Hydra configures logging (a file handler on the run's train.log); put
    the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Hydra finds configs/ beside the file of a task function from __main__ (a module name means a package)
    module.main.__wrapped__.__module__ = "__main__"
    yield module
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_a_full_disk_while_checkpointing_is_one_line_exit_1_and_the_run_resumes(text_corpus, tmp_path, monkeypatch,
                                                                                  capsys, hydra_in_process):
    run = tmp_path / "run"
    args = ["train.py", *CLI, *text_corpus, "trainer.max_steps=6", "trainer.eval_interval=3", f"hydra.run.dir={run}"]
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):  # the second checkpoint: torch.save's RuntimeError around the write's ENOSPC
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *a, **k)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from e

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        hydra_in_process.launch(hydra_in_process.main)
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write checkpoint {run}/checkpoints/step_000006.pt: No space left on device (errno 28); any "
        "previous checkpoint is intact; free space or choose another hydra.run.dir, then resume with "
        "trainer.resume=auto")
    assert ckpt_lib.load_checkpoint(run)["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step_000003.pt"]

    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(sys, "argv", [*args, "trainer.resume=auto"])
    hydra_in_process.launch(hydra_in_process.main)
    assert ckpt_lib.load_checkpoint(run)["step"] == 6
    assert [r["trainer/step"] for r in read_metrics(run) if "train/loss" in r] == list(range(1, 7))
