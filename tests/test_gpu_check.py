"""scripts/gpu_check.py: the token cache it finds offline, its refusal without a GPU, and (slow) its whole dry run
on the CPU: every step ok, four runs with checkpoints, an evaluation of the four schemes at four lengths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import tokenizers
import torch
from conftest import REPO

from roformer.data import DataConfig, open_prepared, prepare

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
spec.loader.exec_module(gpu_check)

SCHEMES = ["rope", "sinusoidal", "learned", "alibi"]
STEPS = ["env", "data", "benchmark", "decode", "cuda_tests", *(f"train_{p}" for p in SCHEMES), "eval"]


def test_the_token_cache_is_found_under_another_tokenizers_version(tmp_path, monkeypatch):
    """The default config's cache is keyed on the tokenizers version that trained its tokenizer; under another
    version only a cache keyed on a tokenizer file opens, and gpu_check passes that file as data.tokenizer_path."""
    rng = np.random.default_rng(0)
    words = "the cat dog sat on a mat log ran fast slow big red blue green house".split()
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 800)) + "\n")
    cfg = DataConfig(name="text_files", train_files=[f"{tmp_path}/doc*.txt"], cache_dir=str(tmp_path / "cache"),
                     vocab_size=300)  # fmt: skip
    trained = prepare(cfg, progress=False)
    assert gpu_check.find_token_cache(cfg)[0] == []  # the config's own cache: no override
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")  # the GPU machine's library
    assert open_prepared(cfg) is None and gpu_check.find_token_cache(cfg) is None
    by_file = prepare(replace(cfg, tokenizer_path=str(trained.cache_path / "tokenizer.json")), progress=False)
    overrides, where = gpu_check.find_token_cache(cfg)
    (override,) = overrides
    assert override.startswith("data.tokenizer_path=") and str(by_file.cache_path) in where
    found = open_prepared(replace(cfg, tokenizer_path=override.split("=", 1)[1]))
    assert found.cache_path == by_file.cache_path and found.tokenizer_hash == trained.tokenizer_hash


def test_a_step_out_of_time_is_stopped_and_its_output_kept(tmp_path):
    check = gpu_check.Check(tmp_path, gpu_check.DRY, True, deadline=time.monotonic() + 60)
    step, log, t = gpu_check.Step("slow"), tmp_path / "logs" / "slow.txt", time.monotonic()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    assert check.run(step, cmd, log, timeout=2) is None  # out of time
    assert time.monotonic() - t < 30 and "started" in log.read_text() and step.log == "logs/slow.txt"
    assert check.run(step, [sys.executable, "-c", "raise SystemExit(3)"], log, timeout=60) == 3


def test_the_cuda_tests_are_found_by_their_marker():
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_gpu_check.py" not in files


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--dry-run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    """The whole check at a tiny shape on the CPU (about 30 s on 2 cores), on the WikiText-2 cache under data/ (made
    first if it is missing, which needs the network)."""
    if gpu_check.find_token_cache(DataConfig(cache_dir=str(REPO / "data"))) is None:
        subprocess.run([sys.executable, "scripts/prepare_data.py", "progress=false"], cwd=REPO, check=True,
                       timeout=900)  # fmt: skip
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [(name, "ok") for name in STEPS]
    table = (out / "summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | ok |" in table, name
    assert "| learned | " in table and "n/a" in table  # the perplexity table
    assert "skipped" in (out / "cuda_tests.txt").read_text()  # collected, and skipped without a GPU

    for pos in SCHEMES:
        assert (out / "runs" / pos / "checkpoints" / "last.pt").is_file(), pos
    bench = json.loads((out / "benchmark.json").read_text())
    cases = [b["scheme"] for b in bench["rows"]]
    assert cases[0] == "hf-llama" and cases[-2:] == ["rope", "rope[plain]"] and all(b["mfu"] > 0 for b in bench["rows"])
    assert {(r["case"], r["vs"]) for r in bench["ratios"]} >= {(c, "hf-llama") for c in cases}
    assert "| rope[plain] | " in table and "vs hf-llama" in table  # the training table with its ratios
    decode = json.loads((out / "decode.json").read_text())["rows"]
    ours = [r for r in decode if r["side"] == "roformer"]
    assert {r["decode"] for r in ours} == {"auto", "static"} and all(r["tok_s"] > 0 for r in ours)
    assert all(r["match"] == 8 for r in decode)  # every case decoded the same 8 greedy ids

    results = json.loads((out / "eval" / "results.json").read_text())["results"]
    lengths = [32, 64, 128, 256]  # the training length 32 x 1, 2, 4, 8
    protocols = {r["protocol"] for r in results}
    assert protocols == {"nonoverlapping", "sliding", "fixed_target"}
    cells = {(r["label"], r["protocol"], r["length"]): r["status"] for r in results}
    want = {(p, proto, n): "n/a" if p == "learned" and n > 32 else "ok"
            for p in SCHEMES for proto in protocols for n in lengths}  # fmt: skip
    assert cells == want
