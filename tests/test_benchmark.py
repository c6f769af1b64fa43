"""scripts/benchmark.py on a toy shape: one row per (scheme, compile setting), paired ratios, JSON output; and
its --ref loader, which imports another checkout of the package beside this one. scripts/benchmark_generate.py's
rows."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_rows_ratios_and_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--schemes", "rope,nope", "--dtypes", "fp32",
         "--vocab", "64", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16", "--batch", "2",
         "--rounds", "3", "--warmup", "1", "--peak-n", "64", "--threads", "1", "--eval-mult", "4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["scheme"], x["compile"], x["threads"]) for x in rows] == [("rope", False, 1), ("nope", False, 1)]
    nope = rows[1]
    assert nope["step_vs_nope"] == 1.0 and nope["step_vs_nope_paired"] == 1.0
    for x in rows:
        model = TransformerLM(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32), PosConfig(name=x["scheme"]))
        assert x["flops_per_token"] == 6 * model.num_params() + 12 * 1 * 16 * 32
        assert x["train_tok_s_min"] <= x["train_tok_s"] <= x["train_tok_s_max"]
        assert x["eval_long_tok_s"] > 0 and 0 < x["mfu_paired"]
    assert "rope" in r.stdout and "MFU*" in r.stdout


_LOAD_REF = """
import sys
sys.path.insert(0, sys.argv[1])
import benchmark
import roformer.kernels
import roformer.model
model, positional = benchmark.load_ref(sys.argv[2])
print(model.__file__, positional.__file__, sys.modules["roformer.model"].__file__, roformer.kernels.__file__)
print(model.attention.__module__, model.attention.__globals__["__file__"])
"""


def test_load_ref_imports_the_other_checkout_and_restores_this_one(tmp_path):
    """A checkout whose model.py imports roformer.kernels gets its own kernels, not this checkout's; afterwards
    this checkout's modules are the ones imported again."""
    ref = tmp_path / "ref"
    shutil.copytree(ROOT / "roformer", ref / "roformer", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-c", _LOAD_REF, str(ROOT / "scripts"), str(ref)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (ref_model, ref_pos, now_model, now_kernels), (attn_module, attn_file) = (
        line.split() for line in r.stdout.splitlines()
    )
    assert Path(ref_model).parent == Path(ref_pos).parent == ref / "roformer"
    assert Path(attn_file) == ref / "roformer" / "kernels.py" and attn_module == "roformer.kernels"
    assert Path(now_model).parent == Path(now_kernels).parent == ROOT / "roformer"


def test_load_ref_refuses_a_path_without_the_package(tmp_path):
    r = subprocess.run([sys.executable, "-c", _LOAD_REF, str(ROOT / "scripts"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode != 0 and f"--ref {tmp_path}: roformer" in r.stderr and "checkout's root" in r.stderr


def test_benchmark_generate_prints_both_layouts_a_profile_and_why_hf_is_skipped():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_generate.py"), "--prompt-len", "8", "--new-tokens", "6",
         "--runs", "3", "--threads", "1", "--no-hf", "--layout-ab", "--profile", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rates = {}
    for line in r.stdout.splitlines():
        for label in ("roformer generate", "roformer decode only", "roformer, F.linear"):
            if line.startswith(label):
                median, lo, hi = (float(x) for x in re.findall(r"\d+\.\d+", line)[:3])
                assert 0 < lo <= median <= hi and "3 runs" in line
                rates[label] = median
    assert len(rates) == 3, r.stdout
    ratio = float(re.search(r"(\d+\.\d+)x slower", r.stdout).group(1))
    assert ratio == pytest.approx(rates["roformer generate"] / rates["roformer, F.linear"], abs=0.01)
    assert "transformers generate  skipped: --no-hf" in r.stdout
    assert "profile: 4 decoding steps after 8 tokens" in r.stdout and "aten::mm" in r.stdout
