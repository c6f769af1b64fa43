"""The training loop: schedules, every scheme learns, exact resume, atomic saves, the NaN guard, wandb offline,
sweeps with a failing job, and (slow) 2-process gloo DDP against one process."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics, tiny_config, wandb_runs

from roformer import checkpoint as ckpt_lib
from roformer.logger import wandb_mode
from roformer.model import TransformerLM
from roformer.optim import Schedule, lr_factor, param_groups
from roformer.positional import SCHEMES
from roformer.runtime import resolve_compile, resolve_precision, setup_runtime
from roformer.training import TrainingDiverged, eval_starts, train, unigram_ppl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


# ----------------------------------------------------------------------------------------------------------
# pieces


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = lambda s: lr_factor(s, warmup=10, max_steps=110, min_ratio=0.1, schedule=Schedule.cosine)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert lr_factor(50, warmup=10, max_steps=110, min_ratio=0.1, schedule=Schedule.constant) == 1.0


def test_weight_decay_on_matrices_only_and_never_on_positional_tables():
    for scheme in ("learned", "relative", "t5", "rope"):
        cfg = tiny_config(f"pos={scheme}")
        model = TransformerLM(cfg.model, cfg.pos)
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert "wte.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
        assert not any(n.startswith("pos.") or "ln" in n for n in decayed)
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unigram_ppl_is_add_one_smoothed_train_frequencies():
    train_tokens, val = np.array([0, 0, 0, 1]), np.array([0, 2])
    p = np.array([4, 2, 1]) / 7  # counts 3, 1, 0 plus one
    assert unigram_ppl(train_tokens, val, 3) == pytest.approx(math.exp(-(math.log(p[0]) + math.log(p[2])) / 2))


def test_validation_windows_are_fixed_and_inside_the_split():
    s = eval_starts(1000, 32, 5)
    assert list(s) == list(eval_starts(1000, 32, 5)) and len(s) == 5
    assert s[0] == 0 and s[-1] + 33 <= 1000
    assert list(eval_starts(100, 32, 0)) == [0, 32, 64]  # 0: every non-overlapping window


def test_precision_auto_resolves_per_device():
    dtype, scaler = resolve_precision("auto", torch.device("cpu"))
    assert dtype in (None, torch.bfloat16) and not scaler
    assert resolve_precision("fp32", torch.device("cpu")) == (None, False)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_compile_auto_by_device_and_run_length():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("true", cpu, 1) and not resolve_compile("false", cuda, 10**6)
    assert not resolve_compile("auto", cpu, 10**6)  # no measured gain on CPU
    assert resolve_compile("auto", cuda, 300) and not resolve_compile("auto", cuda, 299)


# ----------------------------------------------------------------------------------------------------------
# the loop


@pytest.mark.slow
def test_compiled_training_matches_eager(toy_data, tmp_path):
    over = ("trainer.max_steps=6", "trainer.precision=fp32", "trainer.eval_interval=3")
    eager = train(tiny_config(*over, "trainer.compile=false"), tmp_path / "eager", data=toy_data)
    torch._dynamo.reset()
    compiled = train(tiny_config(*over, "trainer.compile=true"), tmp_path / "compiled", data=toy_data)
    assert math.isfinite(eager) and compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_short_run_lowers_the_loss_for_every_scheme(scheme, toy_data, tmp_path):
    best = train(tiny_config(f"pos={scheme}", "trainer.max_steps=30", "trainer.batch_size=16"), tmp_path,
                 data=toy_data)
    rows = read_metrics(tmp_path)
    first = next(r["train/loss"] for r in rows if "train/loss" in r)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert first == pytest.approx(math.log(64), abs=0.3)  # starts near uniform over the 64 tokens
    # the chain's entropy is 0.72 nats; a unigram model cannot go below log(64) = 4.16
    assert val[-1] < first - 1.0 and best == min(val)
    ck = ckpt_lib.load_checkpoint(tmp_path)  # the run folder resolves to checkpoints/last.pt
    assert ck["step"] == 30 and ck["pos_cfg"]["name"] == scheme and (tmp_path / "checkpoints/best.pt").exists()


def test_checkpoint_is_self_describing(toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=10"), tmp_path, data=toy_data)
    ck = ckpt_lib.load_checkpoint(tmp_path / "checkpoints/last.pt")
    for key in ("format", "model_cfg", "pos_cfg", "data_cfg", "train_cfg", "tokenizer_json", "model", "optimizer",
                "scheduler", "rng", "sampler", "step", "tokens_seen", "best_val_loss", "wandb_run_id", "metrics"):
        assert key in ck, key
    assert ck["format"] == {"name": "roformer-checkpoint", "version": 1}
    assert ck["train_cfg"]["trainer"]["precision"] == "fp32"  # enums as plain strings
    assert ck["tokenizer_json"] == toy_data.tokenizer_json and ck["model_cfg"]["vocab_size"] == 64
    assert ck["tokens_seen"] == 10 * 8 * 32 and ck["metrics"]["val/ppl"] == pytest.approx(
        math.exp(ck["metrics"]["val/loss"]))
    model = ckpt_lib.model_from_checkpoint(ck)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact_on_cpu(precision, toy_data, tmp_path):
    """8 steps, 'kill' (the checkpoint a killed run leaves), resume to 16 == 16 straight, bit for bit."""
    over = [f"trainer.precision={precision}", "trainer.max_steps=16", "trainer.eval_interval=8",
            "trainer.keep_last=5", "model.dropout=0.1"]  # dropout: the RNG state must be restored too
    straight = tmp_path / "straight"
    train(tiny_config(*over), straight, data=toy_data)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints/step_000008.pt", resumed / "checkpoints/last.pt")
    train(tiny_config(*over, "trainer.resume=auto"), resumed, data=toy_data)

    def after8(run):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in read_metrics(run)
                if r["trainer/step"] > 8]

    assert after8(resumed) == after8(straight) and len(after8(straight)) == 8 + 1  # 8 train rows + 1 val row
    a, b = (ckpt_lib.load_checkpoint(r / "checkpoints/last.pt") for r in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["wandb_run_id"] == b["wandb_run_id"]  # the same dashboard run continues


def test_resume_auto_without_checkpoint_starts_fresh(toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=4", "trainer.resume=auto"), tmp_path, data=toy_data)
    assert ckpt_lib.load_checkpoint(tmp_path)["step"] == 4


def test_resume_longer_continues_from_the_checkpoint(toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=6"), tmp_path, data=toy_data)
    train(tiny_config("trainer.max_steps=12", f"trainer.resume={tmp_path}"), tmp_path / "more", data=toy_data)
    steps = [r["trainer/step"] for r in read_metrics(tmp_path / "more") if "train/loss" in r]
    assert steps == list(range(7, 13))
    assert ckpt_lib.load_checkpoint(tmp_path / "more/checkpoints/best.pt")["step"] in (10, 12)


def test_resume_from_another_shape_names_the_fields(toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=2"), tmp_path, data=toy_data)
    with pytest.raises(ValueError, match=r"model.d_model=64 in the checkpoint, 32 in this run \(no override can "
                                         r"change it.*pos.name=rope in the checkpoint, alibi in this run"):
        train(tiny_config("model.d_model=32", "pos=alibi", f"trainer.resume={tmp_path}"), tmp_path / "b",
              data=toy_data)


def test_resume_of_a_checkpoint_from_before_model_activation(toy_data, tmp_path):
    """Such a checkpoint was trained with the tanh GELU: resuming it under the new default is refused with the
    field named, and with model.activation=gelu_tanh it resumes."""
    train(tiny_config("trainer.max_steps=2", "model.activation=gelu_tanh"), tmp_path, data=toy_data)
    path = tmp_path / "checkpoints/last.pt"
    ck = torch.load(path, weights_only=False)
    del ck["model_cfg"]["activation"]
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"model.activation=gelu_tanh in the checkpoint, gelu in this run; use "
                                         r"model.activation=gelu_tanh, or trainer.resume_override"):
        train(tiny_config("trainer.max_steps=3", f"trainer.resume={path}"), tmp_path / "b", data=toy_data)
    train(tiny_config("trainer.max_steps=3", "model.activation=gelu_tanh", f"trainer.resume={path}"),
          tmp_path / "c", data=toy_data)  # fmt: skip
    assert ckpt_lib.load_checkpoint(tmp_path / "c/checkpoints/last.pt")["step"] == 3


def test_truncated_foreign_and_missing_checkpoints_give_one_line_errors(toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=2"), tmp_path, data=toy_data)
    good = (tmp_path / "checkpoints/last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": dict(ckpt_lib.FORMAT), "x": Evil()}, evil)
    for path, match in ((cut, "not a readable roformer checkpoint"), (foreign, "not a roformer checkpoint"),
                        (text, "not a readable"), (evil, "could run code"), (tmp_path / "nope.pt", "does not exist"),
                        (tmp_path / "checkpoints/../..", "without checkpoints/last.pt")):
        with pytest.raises(ckpt_lib.CheckpointError, match=match) as e:
            ckpt_lib.load_checkpoint(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ckpt_lib.CheckpointError, match="truncated"):  # and the loop refuses it before any work
        train(tiny_config(f"trainer.resume={cut}"), tmp_path / "r", data=toy_data)


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(toy_data, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):  # the second save dies half way through writing
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        train(tiny_config("trainer.max_steps=8", "trainer.eval_interval=4"), tmp_path, data=toy_data)
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert ckpt_lib.load_checkpoint(folder / "last.pt")["step"] == 4
    assert ckpt_lib.load_checkpoint(folder / "best.pt")["step"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "step_000004.pt"]  # no temp file


def test_save_checkpoint_is_atomic_and_refuses_non_finite_weights(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt_lib.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (f.write(b"garbage"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        ckpt_lib.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    assert ckpt_lib.load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(ckpt_lib.CheckpointError, match="non-finite values in w"):
        ckpt_lib.save_checkpoint(path, {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 3})
    assert ckpt_lib.load_checkpoint(path)["step"] == 1


def _nan_from_call(monkeypatch, n: int) -> None:
    """Make the model's training loss NaN from its n-th training forward on."""
    real, calls = TransformerLM.forward, []

    def forward(self, *a, **k):
        logits, loss = real(self, *a, **k)
        if self.training:
            calls.append(1)
            if len(calls) >= n:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(TransformerLM, "forward", forward)


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(toy_data, tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, 7)
    with pytest.raises(TrainingDiverged) as e:
        train(tiny_config("trainer.max_steps=20", "trainer.eval_interval=5", "optim.lr=0.003"), tmp_path, data=toy_data)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train/loss is nan at step 7; stopped: lower optim.lr (now 0.003) or "
                                               "raise optim.warmup_steps (now ")
    assert msg.endswith(f"trainer.resume={tmp_path}/checkpoints/last.pt "
                        "trainer.resume_override=[optim.lr,optim.warmup_steps]")
    ck = ckpt_lib.load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert max(r["trainer/step"] for r in read_metrics(tmp_path)) == 6  # nothing logged for the bad step


def test_a_huge_learning_rate_names_optim_lr_and_warmup(toy_data, tmp_path):
    """The issue's case: optim.lr=1e4 diverges within a few steps, before any checkpoint; the line says which keys
    to change and that there is nothing to resume."""
    with pytest.raises(TrainingDiverged) as e:
        train(tiny_config("optim.lr=1e4", "optim.warmup_steps=0", "trainer.max_steps=30", "trainer.eval_interval=0"),
              tmp_path, data=toy_data)  # fmt: skip
    msg = str(e.value)
    assert " is nan at step " in msg or " is inf at step " in msg, msg
    assert "lower optim.lr (now 10000) or raise optim.warmup_steps (now 0)" in msg
    assert msg.endswith("start again (no checkpoint was written yet)") and "\n" not in msg
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# wandb


def test_wandb_offline_run_logs_config_and_metrics_readable_from_its_files(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = tiny_config("logger=wandb", "logger.group=g1", "logger.tags=[a,b]", "logger.name=n1",
                      "trainer.max_steps=10", "trainer.eval_interval=5", "trainer.log_interval=2")
    assert wandb_mode(cfg.logger.mode) == "offline"
    train(cfg, tmp_path, data=toy_data)

    (w,) = wandb_runs(tmp_path)
    assert (w.run.run_group, w.run.job_type, w.run.display_name, list(w.run.tags)) == ("g1", "train", "n1", ["a", "b"])
    assert w.run.run_id == ckpt_lib.load_checkpoint(tmp_path)["wandb_run_id"]
    assert w.get("pos.name") == "rope" and w.get("trainer.precision") == "fp32"  # plain values
    assert (w.get("seed"), w.get("trainer.seq_len")) == (0, 32)  # the paths evaluation runs use too
    train_rows = [h for h in w.history if "train/loss" in h]
    assert [h["trainer/step"] for h in train_rows] == [2, 4, 6, 8, 10]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(train_rows[0])
    val_rows = [h for h in w.history if "val/loss" in h]
    assert [h["trainer/step"] for h in val_rows] == [5, 10]
    assert val_rows[-1]["val/ppl"] == pytest.approx(math.exp(val_rows[-1]["val/loss"]))
    assert w.metrics.get("val/loss") == "trainer/step"
    assert w.exit_code == 0


def test_a_diverged_run_is_marked_failed_in_wandb(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _nan_from_call(monkeypatch, 3)
    with pytest.raises(TrainingDiverged):
        train(tiny_config("logger=wandb", "logger.mode=offline"), tmp_path, data=toy_data)
    (w,) = wandb_runs(tmp_path)
    assert w.exit_code == 1


def test_a_wandb_failure_warns_once_and_training_goes_on(toy_data, tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(RuntimeWarning, match="wandb init failed.*continuing without wandb"):
        best = train(tiny_config("logger=wandb", "logger.mode=online", "trainer.max_steps=4"), tmp_path,
                     data=toy_data)
    assert math.isfinite(best) and ckpt_lib.load_checkpoint(tmp_path)["step"] == 4


def test_wandb_mode_auto_is_online_only_when_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"


# ----------------------------------------------------------------------------------------------------------
# the CLI: output folders, sweeps, DDP


def test_unwritable_output_folder_is_refused_before_work(toy_data):
    with pytest.raises(ValueError, match="cannot be written"):
        train(tiny_config(), Path("/proc/roformer-run"), data=toy_data)


CLI_TINY = ["debug=fast", "trainer.progress=false", "trainer.max_steps=6", "trainer.eval_interval=3",
            "trainer.seq_len=32", "trainer.batch_size=4"]


def _run(args, cwd=REPO, timeout=300, **env):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_a_sweep_runs_every_job_even_when_one_fails(text_corpus, tmp_path):
    sweep = tmp_path / "sweep"
    r = _run([sys.executable, "train.py", "-m", *CLI_TINY, *text_corpus, "optim.lr=-1,0.01", "seed=0",
              f"hydra.sweep.dir={sweep}"])
    assert r.returncode != 0  # the sweep reports the failure ...
    (ok,), (bad,) = sweep.glob("*optim.lr=0.01,seed=0,*"), sweep.glob("*optim.lr=-1,seed=0,*")
    assert ckpt_lib.load_checkpoint(ok)["step"] == 6  # ... after the job behind the failing one ran
    assert not (bad / "checkpoints").exists()
    assert "optim.lr=-1.0 must be positive" in r.stderr + r.stdout


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(text_corpus, tmp_path):
    """Per-rank batch 4 on 2 ranks == batch 8 on 1 rank: the same windows (WindowSampler slices one global
    batch), gradients averaged by all-reduce. Tolerance: 1e-5 relative on every logged loss (fp32; only the
    order of float summation differs; measured: 2e-7)."""
    common = [*CLI_TINY, *text_corpus, "trainer.precision=fp32", "trainer.log_interval=1", "trainer.max_steps=8",
              "trainer.eval_interval=4", "trainer.seq_len=32"]
    one = _run([sys.executable, "train.py", *common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path}/one"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "train.py", *common, "trainer.batch_size=4", f"hydra.run.dir={tmp_path}/two"])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["trainer/step"] for r in a] == [r["trainer/step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["trainer/tokens"] == rb["trainer/tokens"]
        for k in ("train/loss", "val/loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5), (ra["trainer/step"], k)
    ck = ckpt_lib.load_checkpoint(tmp_path / "two")
    assert ck["world_size"] == 2 and ck["train_cfg"]["trainer"]["batch_size"] == 4
    assert not (REPO / ".hydra").exists() and not (REPO / "checkpoints").exists()  # rank 1 wrote nothing


@pytest.mark.slow
def test_debug_fast_cli_trains_and_resumes(text_corpus, tmp_path):
    run = tmp_path / "run"
    r = _run([sys.executable, "train.py", *CLI_TINY, *text_corpus, f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "checkpoints/last.pt").exists() and (run / ".hydra/config.yaml").exists()
    r = _run([sys.executable, "train.py", *CLI_TINY, *text_corpus, "trainer.max_steps=9", "trainer.resume=auto",
              f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr and ckpt_lib.load_checkpoint(run)["step"] == 9


def test_trainer_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        setup_runtime("cpu", "fp32", threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        setup_runtime("cpu", "fp32", threads=0)
        assert torch.get_num_threads() == 2  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)
