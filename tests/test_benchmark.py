"""scripts/benchmark.py on a toy shape: one row per (scheme, compile setting), paired ratios, JSON output; its --ref
loader, which imports another checkout of the package beside this one; our variants (--ours) and the peers
(--peer nanogpt=PATH with a stand-in of nanoGPT's interface written here, --peer hf-llama) with their ratios and
their argument errors. scripts/benchmark_generate.py's rows."""

import importlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

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


# What the benchmark asks of nanoGPT's model.py, written for these tests (nanoGPT itself is never copied here):
# GPTConfig with its fields, GPT(config), forward(idx, targets) -> (logits, loss), configure_optimizers(...).
# Like nanoGPT: tied embeddings, a learned position table, targets read with .view (so they must be contiguous).
STAND_IN = """
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.n_head = c.n_embd, c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=c.bias), nn.LayerNorm(d, bias=c.bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=c.bias), nn.Linear(d, d, bias=c.bias)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=c.bias), nn.GELU(), nn.Linear(4 * d, d, bias=c.bias))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(self.ln_1(x)).split(C, dim=2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
"""

TINY = ["--schemes", "rope", "--dtypes", "fp32", "--vocab", "256", "--d-model", "32", "--n-layer", "2", "--n-head",
        "2", "--seq-len", "16", "--batch", "2", "--rounds", "2", "--warmup", "1", "--peak-n", "64", "--threads", "1",
        "--eval-mult", "2", "--compile", "off"]  # fmt: skip


def run_tiny(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *TINY, *extra, "--json", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "against " in r.stdout
    return json.loads(out.read_text())


def check_rows_and_ratios(data: dict, names: list[str], peers: list[str]) -> dict:
    rows = {r["scheme"]: r for r in data["rows"]}
    assert list(rows) == names
    for r in rows.values():
        assert math.isfinite(r["train_tok_s"]) and r["train_tok_s"] > 0 and r["eval_tok_s"] > 0
        assert 0 < r["first_steps_s"] <= r["warmup_s"] and r["mfu"] > 0
        assert r["peak_train_mem_mb"] is None and r["state_mb"] is None  # CPU
        assert (r["peer"] is None) == (r["code"] == "now") and (r["peer"] is None) == (r["loss"] is not None)
    for p in peers:
        assert rows[p]["peer"] == p and rows[p]["eval_long_tok_s"] is None and rows[p]["step_vs_nope"] is None
    ratios = {(x["case"], x["vs"]): x for x in data["ratios"]}
    assert set(ratios) == {(n, p) for n in names for p in peers}
    for (case, vs), x in ratios.items():
        assert x["train_tok_s"] > 0 and x["first_steps_s"] > 0 and x["peak_train_mem_mb"] is None
        if case == vs:
            assert x["train_tok_s"] == 1.0 and x["first_steps_s"] == 1.0
    return rows


def test_benchmark_times_our_variants_and_a_nanogpt_checkout_in_the_same_rounds(tmp_path):
    checkout = tmp_path / "nanoGPT"
    checkout.mkdir()
    (checkout / "model.py").write_text(STAND_IN)
    data = run_tiny(tmp_path, "--peer", f"nanogpt={checkout}", "--ours", "auto:auto,plain:model")
    assert data["args"]["peer"] == [["nanogpt", str(checkout / "model.py")]]
    # without compile there is no scope to choose: plain:model is the plain loss, labelled so
    rows = check_rows_and_ratios(data, ["nanogpt", "rope", "rope[plain]"], ["nanogpt"])
    assert (rows["rope"]["loss"], rows["rope"]["scope"]) == ("auto", None)
    assert (rows["rope[plain]"]["loss"], rows["rope[plain]"]["pos"]) == ("plain", "rope")
    assert rows["rope"]["eval_long_tok_s"] > 0
    # matmul parameters: per block qkv, proj and the MLP (12 d^2) and two norms; the final norm; the tied
    # embedding once, as the LM head; not the position table, which is looked up. The same count as ours.
    d, L, V, T = 32, 2, 256, 16
    assert rows["nanogpt"]["flops_per_token"] == 6 * (L * (12 * d * d + 2 * d) + d + V * d) + 12 * L * T * d
    assert rows["nanogpt"]["flops_per_token"] == rows["rope"]["flops_per_token"]


def test_benchmark_times_transformers_llama(tmp_path):
    pytest.importorskip("transformers")
    data = run_tiny(tmp_path, "--peer", "hf-llama")
    rows = check_rows_and_ratios(data, ["hf-llama", "rope"], ["hf-llama"])
    d, L, V, T, h = 32, 2, 256, 16, 85  # SwiGLU width 8 d / 3: as many MLP parameters as ours
    assert rows["hf-llama"]["flops_per_token"] == 6 * (L * (4 * d * d + 3 * d * h + 2 * d) + d + V * d) + 12 * L * T * d


def script_module(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module(name)


def test_hf_llama_peer_scores_our_targets_but_the_last_and_matches_our_mlp(monkeypatch):
    pytest.importorskip("transformers")
    bp = script_module(monkeypatch, "benchmark_peers")
    assert [bp.llama_intermediate(d) for d in (32, 256, 768, 1024)] == [85, 768, 2048, 2816]
    args = SimpleNamespace(vocab=64, d_model=32, n_layer=1, n_head=2, seq_len=16, optimizer="default",
                           compile_mode=None)  # fmt: skip
    b = bp.build_hf_llama(args, "cpu", False)
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1], x[:, 1:]
    logits = b.forward(inp)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 64).float(), tgt[:, :-1].reshape(-1))
    assert b.loss(inp, tgt).item() == pytest.approx(ref.item(), rel=1e-5)


def test_peers_are_built_first_and_only_the_first_compile_of_our_code_counts_as_cold(monkeypatch):
    """In one process a later model of ours reuses what an earlier one compiled (dynamo's traced block frame,
    inductor's kernels), so its compile time is no cold one: the plan says which cases are."""
    bm = script_module(monkeypatch, "benchmark")
    args = SimpleNamespace(attention="softmax", schemes=["rope", "alibi"], peer=[("hf-llama", "")],
                           ours=[("plain", "blocks"), ("auto", "auto"), ("blocked", "blocks")])  # fmt: skip
    codes = {"now": None, "ref": None}
    on = bm.plan(args, [True], "cpu", codes)
    assert list(on)[0] == "hf-llama+compile" and on["hf-llama+compile"]["cold"]
    assert [n for n, c in on.items() if c["cold"]] == ["hf-llama+compile", "rope[plain:blocks]+compile",
                                                       "rope@ref[plain:blocks]+compile"]  # fmt: skip
    assert len(on) == 1 + 2 * 2 * 3
    off = bm.plan(args, [False], "cpu", codes)  # eager: nothing compiled, so every case is cold
    assert all(c["cold"] for c in off.values()) and len(off) == 1 + 2 * 2 * 3


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [("--peer", "gpt5", "unknown peer 'gpt5'"), ("--peer", "nanogpt={missing}", "no model.py there"),
     ("--peer", "nanogpt", "needs its path"), ("--ours", "plain:everything", "plain:everything is not LOSS:SCOPE")],
)  # fmt: skip
def test_benchmark_refuses_a_bad_peer_or_variant_in_one_line(tmp_path, monkeypatch, capsys, flag, value, says):
    value = value.format(missing=tmp_path / "nowhere")
    bench = script_module(monkeypatch, "benchmark")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", flag, value])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"benchmark.py: error: argument {flag}: {value}: ") and says in last


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
    assert Path(ref_model).parent == ref / "roformer" and Path(ref_pos) == ref / "roformer/positional/__init__.py"
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
