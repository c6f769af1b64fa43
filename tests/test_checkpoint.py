"""Checkpoint files: refusals that are safe to follow, a full disk named as such, leftovers of killed writes."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from roformer import checkpoint as ckpt_lib


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("kind", ["pickle", "random", "text"])
def test_a_foreign_file_is_refused_without_the_unsafe_hint(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.pt"
    if kind == "pickle":
        torch.save({"format": dict(ckpt_lib.FORMAT), "x": Evil()}, path)
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_text("hello")
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only" not in msg and "roformer checkpoint" in msg
    assert ("could run code" in msg) == (kind == "pickle")
    assert not (tmp_path / "pwned.txt").exists()  # the payload never ran


def test_a_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_lib.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch.save does when the file's write fails with ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from e

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    assert str(e.value).startswith(f"cannot write checkpoint {path}: No space left on device (errno 28)")
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_lib.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_other_save_failures_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        ckpt_lib.save_checkpoint(tmp_path / "c.pt", {"model": {}, "step": 1})


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    ckpt_lib.save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(3)}, "step": 1})
    left = [tmp_path / ".step_000004.pt.abc123.tmp", tmp_path / ".last.pt.x9.tmp"]
    for p in left:
        p.write_bytes(b"half a checkpoint")
    assert sorted(ckpt_lib.remove_stale_temps(tmp_path)) == sorted(left)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
