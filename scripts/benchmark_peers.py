"""Peers for scripts/benchmark.py: other implementations of a GPT-style LM, built at our shape and timed in the same
rounds as ours, so that the ratios it prints are paired (same moment of the machine, same batch, same autocast).

    --peer nanogpt=PATH   nanoGPT's model.py (PATH: a checkout, or the file itself), imported from there under a
                          private module name, never copied into this repository, and built as its train.py builds
                          it: bias=False, dropout=0, ``configure_optimizers`` (AdamW, fused on CUDA by its own
                          choice, weight decay 0.1 on 2-D parameters), ``logits, loss = model(x, y)``
    --peer hf-llama       transformers' LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, SDPA attention) with fp32 weights,
                          tied embeddings and an MLP as large as ours; AdamW as ours (--optimizer)

Each is a :class:`Built`: model, optimizer, the loss of a training step, the evaluation forward and its training
FLOPs per token in TransformerLM.flops_per_token's convention. :func:`ratios` sets every case against each peer.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAMW = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}


@dataclass
class Built:
    """One case, ready to time."""

    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable  # (inputs, targets) (B, T) each -> the mean next-token loss; called under autocast
    forward: Callable  # (B, T) inputs -> every position's logits (evaluation, under inference mode)
    flops_per_token: float
    long_eval: bool = False  # whether evaluation past seq_len is tried: ours (learned may refuse); never a peer


def adamw(model: nn.Module, kind: str, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW with weight decay 0.1 on the >= 2-D parameters (matrices, embeddings), none on the rest;
    ``kind``: the implementation (--optimizer)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, **ADAMW[kind])


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in a matrix multiply: all of them (tied ones once) less the embedding tables
    that are only looked up; a table tied to a linear layer (the LM head) is a matmul and counts."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    lookups = sum(w.numel() for w in tables if id(w) not in linear)
    return sum(p.numel() for p in model.parameters()) - lookups


def flops_per_token(model: nn.Module, args) -> float:
    """Training FLOPs per token as TransformerLM.flops_per_token counts them: 6 N + 12 n_layer seq_len d_model."""
    return 6 * matmul_params(model) + 12 * args.n_layer * args.seq_len * args.d_model


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a case keeps between steps: its parameters (tied ones once) and its optimizer's state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if torch.is_tensor(t))  # fmt: skip


def nanogpt_file(path: str) -> Path:
    p = Path(path).expanduser()
    f = p / "model.py" if p.is_dir() else p
    if not f.is_file():
        raise argparse.ArgumentTypeError(f"nanogpt={path}: no model.py there; give a nanoGPT checkout or its model.py")
    return f.resolve()


@functools.cache
def load_nanogpt(file: Path):
    """nanoGPT's model.py as a module of its own (``_benchmark_peer_nanogpt``), whichever folder it lives in."""
    name = "_benchmark_peer_nanogpt"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclass (GPTConfig) looks its module up there
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise argparse.ArgumentTypeError(f"nanogpt={file}: importing it failed: {type(e).__name__}: {e}") from e
    missing = [a for a in ("GPT", "GPTConfig") if not hasattr(module, a)]
    if missing:
        raise argparse.ArgumentTypeError(f"nanogpt={file}: no {' or '.join(missing)} in it; is it nanoGPT's model.py?")
    return module


def build_nanogpt(args, device: str, compile_: bool, path: str) -> Built:
    mod = load_nanogpt(Path(path))
    torch.manual_seed(0)
    cfg = mod.GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.d_model, block_size=args.seq_len,
                        bias=False, vocab_size=args.vocab, dropout=0.0)  # fmt: skip
    model = mod.GPT(cfg).to(device)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95),
                                     device_type=torch.device(device).type)  # fmt: skip
    fwd = torch.compile(model, mode=args.compile_mode) if compile_ else model
    # without targets nanoGPT computes the last position's logits only: evaluation passes some, to get them all
    return Built(model, opt, loss=lambda x, y: fwd(x, y)[1], forward=lambda x: fwd(x, x)[0],
                 flops_per_token=flops_per_token(model, args))  # fmt: skip


def llama_intermediate(d_model: int) -> int:
    """SwiGLU width whose three d x h matrices hold as many parameters as our GELU MLP's two d x 4d ones
    (3 h = 8 d). Llama rounds 8 d / 3 up to a multiple of 256; this rounds to the nearest multiple, whose
    count is the closer one (d = 768: 2048, exactly ours), and leaves toy widths below 256 unrounded (256 would
    be several times ours)."""
    h = 8 * d_model / 3
    return max(1, round(h)) if h < 256 else 256 * round(h / 256)


def llama_classes():
    """(LlamaConfig, LlamaForCausalLM). transformers is optional (nothing else here needs it): imported only when
    this peer is asked for, first while --peer is parsed, so that the import does not count in a case's
    first_steps_s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM


def build_hf_llama(args, device: str, compile_: bool, path: str = "") -> Built:
    LlamaConfig, LlamaForCausalLM = llama_classes()
    torch.manual_seed(0)
    d = args.d_model
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=llama_intermediate(d),
                      num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      use_cache=False, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device)  # fp32 weights: the autocast is the benchmark's, as for ours
    opt = adamw(model, args.optimizer)
    fwd = torch.compile(model, mode=args.compile_mode) if compile_ else model
    # Labels are the inputs themselves: the model shifts them, scoring position t's logits against input t + 1,
    # which is our target t. Its last position has no label inside the window (ours has the token after it), so
    # it scores T - 1 of our T targets per row; its logits are still computed, so the work differs by one row of
    # the cross-entropy. (The model ignores ``targets``.)
    return Built(model, opt, loss=lambda x, y: fwd(input_ids=x, labels=x).loss,
                 forward=lambda x: fwd(input_ids=x).logits, flops_per_token=flops_per_token(model, args))  # fmt: skip


PEERS: dict[str, Callable[..., Built]] = {"nanogpt": build_nanogpt, "hf-llama": build_hf_llama}


def parse_peer(value: str) -> tuple[str, str]:
    """argparse type of --peer: NAME[=PATH] -> (name, path or ""), checked now so a typo fails before any timing."""
    name, _, path = value.partition("=")
    if name not in PEERS:
        raise argparse.ArgumentTypeError(f"{value}: unknown peer {name!r}; choose from {', '.join(PEERS)}")
    if name == "nanogpt":
        if not path:
            raise argparse.ArgumentTypeError(f"{value}: nanogpt needs its path, e.g. nanogpt=~/nanoGPT")
        path = str(nanogpt_file(path))
        load_nanogpt(Path(path))
    elif path:
        raise argparse.ArgumentTypeError(f"{value}: {name} takes no path; write --peer {name}")
    else:
        try:
            llama_classes()
        except ImportError as e:
            raise argparse.ArgumentTypeError(f"{value}: needs transformers ({e}); pip install transformers") from e
    return name, path


def ratios(rows: list[dict], train_s: dict[str, list[float]]) -> list[dict]:
    """Every row set against each peer row of the same compile setting (rows from one set of rounds): training
    tokens/s ratio as the median over rounds of the per-round ratio (> 1: faster than the peer), and the ratios of
    first_steps_s (compile and first steps) and of peak_train_mem_mb (CUDA only; else None)."""
    out = []
    for p in (r for r in rows if r["peer"]):
        for r in (r for r in rows if r["compile"] == p["compile"]):
            a, b = r["peak_train_mem_mb"], p["peak_train_mem_mb"]
            pairs = zip(train_s[p["scheme"]], train_s[r["scheme"]], strict=True)
            out.append({"case": r["scheme"], "vs": p["scheme"], "dtype": r["dtype"], "threads": r["threads"],
                        "train_tok_s": statistics.median(tp / tr for tp, tr in pairs),
                        "first_steps_s": r["first_steps_s"] / p["first_steps_s"],
                        "peak_train_mem_mb": a / b if a and b else None})  # fmt: skip
    return out


def fmt_ratios(rs: list[dict]) -> str:
    """One small table per (peer, dtype, threads)."""
    lines = []
    width = max((len(r["case"]) for r in rs), default=0) + 2
    for key, group in group_by(rs, lambda r: (r["vs"], r["dtype"], r["threads"])):
        vs, dtype, threads = key
        lines += ["", f"against {vs} ({dtype}, threads={threads})",
                  f"{'case':<{width}}{'train tok/s':>12}{'first steps s':>14}{'peak memory':>12}"]  # fmt: skip
        for r in group:
            mem = f"{r['peak_train_mem_mb']:.2f}x" if r["peak_train_mem_mb"] else "-"
            lines.append(f"{r['case']:<{width}}{r['train_tok_s']:>11.3f}x{r['first_steps_s']:>13.2f}x{mem:>12}")
    if lines:
        lines.append("train tok/s: median over rounds of (peer's step time / this one's), > 1: faster than the peer; "
                     "first steps s (build, compile, --warmup steps) and memory: this / the peer's")  # fmt: skip
    return "\n".join(lines)


def group_by(items, key):
    """Groups by ``key`` in first-seen order (items need not be sorted)."""
    groups: dict = {}
    for x in items:
        groups.setdefault(key(x), []).append(x)
    return groups.items()
