"""The shared file helpers (roformer/files.py) and the permissions of every result file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from roformer.files import atomic_write, check_creatable, ensure_writable, one_line
from roformer.reporting import write_outputs


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("content", ["text ü\n", b"\x00bytes", lambda f: f.write(b"by a writer")])
def test_atomic_write_gives_open_permissions_and_leaves_no_temp(tmp_path, umask_022, content):
    path = atomic_write(tmp_path / "out.txt", content)
    assert mode(path) == 0o644  # what open() gives under umask 022, not mkstemp's 0600
    expected = content if isinstance(content, bytes) else b"by a writer" if callable(content) else content.encode()
    assert path.read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        assert mode(atomic_write(tmp_path / "private", "x")) == 0o600
    finally:
        os.umask(old)


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = atomic_write(tmp_path / "r.json", "old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_ensure_writable_and_check_creatable(tmp_path):
    assert ensure_writable(tmp_path / "a" / "b", "hydra.run.dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"folder .*file/sub cannot be written .*choose another with data.cache_dir="):
        ensure_writable(tmp_path / "file" / "sub", "data.cache_dir")
    check_creatable(tmp_path / "new" / "deep", "hydra.run.dir")
    assert not (tmp_path / "new").exists()  # checks, creates nothing
    with pytest.raises(ValueError, match=r"cannot be created \(not a folder in .*file\); choose another with hydra"):
        check_creatable(tmp_path / "file" / "x", "hydra.run.dir")


def test_one_line():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("x" * 400, limit=10) == "xxxxxxx..."


def test_every_result_file_is_readable_by_others(tmp_path, umask_022):
    """results.json/csv/md and the three plots: mode 0644 under umask 022, as a collaborator on shared storage
    needs."""
    row = {"label": "pos=rope", "variant": "rope", "scheme": "rope", "rope_scaling": "none", "seed": 0, "train_len": 8,
           "protocol": "nonoverlapping", "status": "ok", "note": "", "nll_sum": 10.0, "tokens": 10, "bytes": 40,
           "words": 8, "bits_per_byte": 0.36, "word_ppl": 3.5}
    results = {
        "format": {"name": "roformer-eval", "version": 1}, "settings": {"split": "test"},
        "checkpoints": [{"label": "pos=rope", "train_len": 8}],
        "results": [{**row, "length": L, "ppl": 2.7 + L / 100, "ratio": None} for L in (8, 16)],
        "per_position": [{"label": "pos=rope", "variant": "rope", "rope_scaling": "none", "length": 16,
                          "mean_loss": [1.0] * 16}],
    }
    paths = write_outputs(results, tmp_path / "eval")
    assert sorted(p.name for p in paths) == sorted(
        ["results.json", "results.csv", "results.md", "ppl_vs_length.png", "ppl_ratio_vs_length.png",
         "per_position.png"])
    assert {p.name: mode(p) for p in paths} == {p.name: 0o644 for p in paths}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(p.name for p in paths)  # no temp files
