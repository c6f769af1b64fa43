"""Fine-tuning (trainer.init_from): a fresh run from exactly the source's weights, with a fresh optimizer and schedule,
RoPE's context extension at a longer seq_len (a scaling, or ABF's larger base), its provenance in every checkpoint;
another architecture, another
tokenizer, a file that is no checkpoint or a missing path refused in one line, writing nothing; a checkpoint to
resume wins over it."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, tiny_config

from roformer import checkpoint as ckpt_lib
from roformer import training
from roformer.files import to_plain
from roformer.positional import PosConfig, RopeScaling, rope_inv_freq, scaled_inv_freq
from roformer.resume import architecture_change
from roformer.training import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

# the fine-tune: 4 steps, checkpoints at 2 and 4
FT = ["trainer.max_steps=4", "trainer.eval_interval=2", "trainer.keep_last=3"]


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def source(toy_data, tmp_path_factory) -> Path:
    """A tiny run of 4 steps (checkpoints at 2 and 4): the model to fine-tune."""
    run = tmp_path_factory.mktemp("source") / "run"
    train(tiny_config("trainer.max_steps=4", "trainer.eval_interval=2", "trainer.keep_last=3"), run, data=toy_data)
    return run


def _capture_first_step(mp: pytest.MonkeyPatch) -> dict:
    """Wrap training.train_step: what the trainee was before its first update, and the RoPE table it trained with."""
    seen, step = {}, training.train_step

    def spy(tr, rt, t, grad_clip, p):
        if not seen:
            seen.update(weights={k: v.clone() for k, v in tr.raw.state_dict().items()}, lr=tr.sched.get_last_lr()[0],
                        opt_state=len(tr.opt.state), sched_epoch=tr.sched.last_epoch, step=p.step, tokens=p.tokens_seen)
        out = step(tr, rt, t, grad_clip, p)
        seen["pos"] = tr.raw.pos
        return out

    mp.setattr(training, "train_step", spy)
    return seen


@pytest.fixture(scope="module")
def fine_tuned(source, toy_data, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("ft") / "run"
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_first_step(mp)
        train(tiny_config(*FT, f"trainer.init_from={source}", "optim.lr=1e-3"), run, data=toy_data)
    return run, seen


def test_a_fine_tune_starts_from_the_source_weights_with_a_fresh_optimizer_and_schedule(source, fine_tuned):
    run, seen = fine_tuned
    src = ckpt_lib.load_checkpoint(source)
    assert src["init_from"] is None  # trained from scratch
    assert same_weights(seen["weights"], src["model"])
    assert seen["opt_state"] == 0 and seen["sched_epoch"] == 0 and seen["step"] == 0 and seen["tokens"] == 0
    assert seen["lr"] == pytest.approx(1e-3 / 2)  # warmup step 1 of 2 of this run's optim.lr
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["step"] == 4 and ck["tokens_seen"] == 4 * 8 * 32 and ck["scheduler"]["last_epoch"] == 4
    assert all(int(s["step"]) == 4 for s in ck["optimizer"]["state"].values())
    assert ck["init_from"] == {"path": str(source / "checkpoints/last.pt"), "step": 4, "tokens_seen": 4 * 8 * 32,
                               "run_name": src["train_cfg"]["logger"]["name"], "seed": 0}
    assert ckpt_lib.load_checkpoint(run / "checkpoints/step_000002.pt")["init_from"] == ck["init_from"]
    assert [r["trainer/step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4]


def test_rope_context_extension_fine_tunes_at_four_times_the_length(source, toy_data, tmp_path, caplog):
    run = tmp_path / "long"
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="roformer.training"):
        seen = _capture_first_step(mp)
        train(tiny_config("trainer.max_steps=2", "trainer.eval_interval=0", "trainer.seq_len=128", "pos.scaling=pi",
                          "pos.scaling_factor=4", "pos.original_len=32", f"trainer.init_from={source}/checkpoints"),
              run, data=toy_data)
    assert same_weights(seen["weights"], ckpt_lib.load_checkpoint(source)["model"])
    # it trained with the interpolated angles: position m at m / 4 (the first frequency is 1)
    cos = seen["pos"].cos_cached[:128, 0]
    assert torch.allclose(cos, torch.cos(torch.arange(128, dtype=torch.float64) / 4).float())
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["pos_cfg"]["scaling"] == "pi" and ck["pos_cfg"]["scaling_factor"] == 4.0
    assert ck["pos_cfg"]["original_len"] == 32 and ck["train_cfg"]["trainer"]["seq_len"] == 128
    assert ck["init_from"]["path"] == str(source / "checkpoints/last.pt") and ck["init_from"]["step"] == 4
    assert math.isfinite(ck["metrics"]["val/loss"])
    assert f"initialised from {source}/checkpoints/last.pt (step 4)" in caplog.text
    assert ckpt_lib.model_from_checkpoint(ck).pos.cfg.scaling == RopeScaling.pi


def table(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's float32 cos/sin of float64 angles, as the model computes them."""
    return angles.cos().float(), angles.sin().float()


def test_abf_fine_tunes_with_a_larger_base_and_a_resume_keeps_it(source, toy_data, tmp_path):
    """ABF (Xiong et al. 2023): trainer.init_from with pos.base raised 10000 -> 500000 at 4 x the length trains
    with the new base; that fine-tune resumed with another base is refused, as any resume is."""
    run = tmp_path / "abf"
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_first_step(mp)
        train(tiny_config("trainer.max_steps=2", "trainer.eval_interval=0", "trainer.seq_len=128", "pos.base=500000",
                          f"trainer.init_from={source}"), run, data=toy_data)
    assert same_weights(seen["weights"], ckpt_lib.load_checkpoint(source)["model"])
    pos, n = seen["pos"], torch.arange(128, dtype=torch.float64)
    cos, sin = table(torch.outer(n, rope_inv_freq(pos.rot_dim, 500000.0)))
    assert torch.equal(pos.cos_cached[:128], cos) and torch.equal(pos.sin_cached[:128], sin)
    assert not torch.equal(cos, table(torch.outer(n, rope_inv_freq(pos.rot_dim, 10000.0)))[0])
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["pos_cfg"]["base"] == 500000.0 and ck["pos_cfg"]["scaling"] == "none"
    assert ck["init_from"]["path"] == str(source / "checkpoints/last.pt")
    assert ckpt_lib.model_from_checkpoint(ck).pos.cfg.base == 500000.0
    before = sorted(files(run))
    with pytest.raises(ValueError) as e:  # the run's own config, but for the base: back to the default 10000
        train(tiny_config("trainer.max_steps=3", "trainer.eval_interval=0", "trainer.seq_len=128",
                          "trainer.resume=auto"), run, data=toy_data)
    assert str(e.value).startswith(f"cannot resume from {run}/checkpoints/last.pt: pos.base=500000.0 in the "
                                   "checkpoint, 10000.0 in this run; use pos.base=500000.0, or "
                                   "trainer.resume_override=[pos.base]")
    assert sorted(files(run)) == before


def test_llama3_scaling_fine_tunes_at_four_times_the_length(source, toy_data, tmp_path):
    """pos.scaling=llama3 and its factors are a context extension too: the fine-tune trains with its frequencies."""
    run = tmp_path / "llama3"
    ext = ["pos.scaling=llama3", "pos.scaling_factor=4", "pos.original_len=32", "pos.high_freq_factor=5"]
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_first_step(mp)
        train(tiny_config("trainer.max_steps=2", "trainer.eval_interval=0", "trainer.seq_len=128", *ext,
                          f"trainer.init_from={source}"), run, data=toy_data)
    pos = seen["pos"]
    llama3 = PosConfig(scaling="llama3", scaling_factor=4.0, original_len=32, high_freq_factor=5.0)
    inv_freq, temperature = scaled_inv_freq(llama3, pos.rot_dim, 128)
    assert temperature == 1.0 and pos.mscale == 1.0
    plain = rope_inv_freq(pos.rot_dim, 10000.0)
    # head_dim 32 from L0 = 32: the first frequency kept, the next two on the ramp, the rest divided by 4
    assert inv_freq[0] == plain[0] and torch.equal(inv_freq[3:], plain[3:] / 4)
    assert ((plain[1:3] / 4 < inv_freq[1:3]) & (inv_freq[1:3] < plain[1:3])).all()
    cos, sin = table(torch.outer(torch.arange(128, dtype=torch.float64), inv_freq))
    assert torch.equal(pos.cos_cached[:128], cos) and torch.equal(pos.sin_cached[:128], sin)
    ck = ckpt_lib.load_checkpoint(run)
    assert ck["pos_cfg"]["scaling"] == "llama3" and ck["pos_cfg"]["high_freq_factor"] == 5.0
    assert ckpt_lib.model_from_checkpoint(ck).pos.cfg.scaling == RopeScaling.llama3


def test_the_base_is_free_only_for_a_scheme_with_a_context_extension(source):
    """pos.base is RoPE's context extension (ABF); the sinusoid's base is part of what its weights learned."""
    rope = ckpt_lib.load_checkpoint(source)
    assert architecture_change(rope, tiny_config("pos.base=500000")) is None
    sinusoidal = {**rope, "pos_cfg": to_plain(PosConfig(name="sinusoidal"))}
    change = architecture_change(sinusoidal, tiny_config("pos=sinusoidal", "pos.base=500000"))
    assert change.describe() == "pos.base=10000.0 in the checkpoint, 500000.0 in this run"


@pytest.mark.parametrize("override, named", [
    ("model.d_model=32", "model.d_model=64 in the checkpoint, 32 in this run"),
    ("model.n_layer=3", "model.n_layer=2 in the checkpoint, 3 in this run"),
    ("pos=alibi", "pos.name=rope in the checkpoint, alibi in this run"),
    ("pos.layout=interleaved", "pos.layout=half in the checkpoint, interleaved in this run"),
])
def test_another_architecture_is_refused_in_one_line_before_any_work(override, named, source, tmp_path, no_data):
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        train(tiny_config(override, f"trainer.init_from={source}"), run)
    msg = str(e.value)
    assert msg.startswith(f"cannot initialise from {source}/checkpoints/last.pt (trainer.init_from): {named}; ")
    assert "\n" not in msg and files(run) == []


def test_what_the_weights_do_not_depend_on_may_change(source, toy_data, tmp_path):
    train(tiny_config("trainer.max_steps=1", "trainer.eval_interval=0", "model.dropout=0.1", "model.init_std=0.01",
                      "seed=3", "data.split_seed=2", f"trainer.init_from={source}"), tmp_path / "run", data=toy_data)
    assert ckpt_lib.load_checkpoint(tmp_path / "run")["step"] == 1


def test_another_tokenizer_is_refused(source, toy_data_other_tokenizer, tmp_path):
    other = toy_data_other_tokenizer
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        train(tiny_config(f"trainer.init_from={source}"), run, data=other)
    assert str(e.value) == (f"cannot initialise from {source}/checkpoints/last.pt (trainer.init_from): its tokenizer "
                            "is not this run's data's (vocab 64 in the checkpoint, 32 in this run); its weights hold a "
                            "row per token: use the checkpoint's data.* settings")
    assert files(run) == []


def test_a_file_that_is_no_checkpoint_and_a_missing_path_are_refused(tmp_path, no_data):
    with pytest.raises(ValueError, match=r"^trainer.init_from=/no/such/run: no such file or folder; give the "):
        tiny_config("trainer.init_from=/no/such/run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder without checkpoints/last.pt"):
        tiny_config(f"trainer.init_from={tmp_path}/empty")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=rf"^trainer.init_from: {re.escape(str(junk))} is not a"):
        train(tiny_config(f"trainer.init_from={junk}"), tmp_path / "run")
    assert files(tmp_path / "run") == []
    with pytest.raises(ValueError, match=r"^pos.scaling=pi, pos.scaling_factor=2.0, pos.original_len=32: pos=alibi "
                                         r"does not read them \(alibi reads [^;]*; "
                                         r"pos.scaling, pos.scaling_factor, pos.original_len are read by rope\); "
                                         r"drop them$"):
        tiny_config("pos=alibi", "pos.scaling=pi", "pos.scaling_factor=2", "pos.original_len=32")


def test_a_checkpoint_to_resume_wins_and_the_fine_tune_continues_exactly(source, fine_tuned, toy_data, tmp_path,
                                                                         caplog):
    """An interrupted fine-tune (its step-2 checkpoint) resumed with another trainer.init_from: the resume wins (the
    init_from is not a run-defining key), and it ends with the uninterrupted fine-tune's weights."""
    straight = fine_tuned[0]
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints/step_000002.pt", cut / "checkpoints/last.pt")
    with caplog.at_level(logging.INFO, logger="roformer.training"):
        train(tiny_config(*FT, "optim.lr=1e-3", f"trainer.init_from={source}/checkpoints/step_000002.pt",
                          "trainer.resume=auto"), cut, data=toy_data)
    assert f"trainer.init_from={source}/checkpoints/step_000002.pt ignored: resuming" in caplog.text
    assert "initialised from" not in caplog.text
    a, b = ckpt_lib.load_checkpoint(cut), ckpt_lib.load_checkpoint(straight)
    assert a["step"] == 4 and same_weights(a["model"], b["model"])
    assert a["init_from"] == b["init_from"] and a["init_from"]["path"] == str(source / "checkpoints/last.pt")


def test_cli_refuses_another_architecture_in_one_line_and_leaves_no_run_folder(source, tmp_path):
    run = tmp_path / "ft"
    r = subprocess.run([sys.executable, "train.py", "debug=fast", "model.d_model=32", f"trainer.init_from={source}",
                        f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr  # refused at run time, like a resume: exit 1
    assert r.stderr.splitlines() == [f"error: cannot initialise from {source}/checkpoints/last.pt (trainer.init_from): "
                                     "model.d_model=64 in the checkpoint, 32 in this run; its weights fit only the "
                                     "same architecture: use model.d_model=64, or trainer.init_from='' to train this "
                                     "model from scratch"]
    assert not run.exists()
