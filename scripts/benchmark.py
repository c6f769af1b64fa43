"""Throughput benchmark: training and evaluation speed of each positional scheme, MFU against a measured peak.

    python scripts/benchmark.py                                  # reference CPU shape, every scheme, fp32+bf16
    python scripts/benchmark.py --schemes rope,nope --dtypes bf16 --compile off,on --json bench.json
    python scripts/benchmark.py --device cuda --vocab 50304 --d-model 768 --n-layer 12 --n-head 12 \\
        --seq-len 1024 --batch 16 --dtypes bf16 --compile on --schemes rope,nope --optimizer fused
                                                                 # GPT-2 small on a GPU (issue 7 target: MFU >= 45%)
    git worktree add /tmp/roformer-before 7700ad6                # an older checkout of the package ...
    python scripts/benchmark.py --ref /tmp/roformer-before --schemes rope,nope --dtypes bf16 --threads 1,2
                                                                 # ... timed in the same rounds as this one
    python scripts/benchmark.py --device cuda --vocab 50304 --d-model 768 --n-layer 12 --n-head 12 --seq-len 1024 \\
        --batch 16 --dtypes bf16 --compile on --schemes rope --optimizer fused \\
        --peer nanogpt=~/nanoGPT --peer hf-llama --ours auto:auto,plain:blocks --fresh-cache
                                                                 # ours against nanoGPT and transformers' Llama

Per case (dtype, compile, scheme, variant; or peer): training tokens/s for a full step (forward, backward, AdamW
step), model FLOPs per token (6 N + 12 n_layer seq_len d_model), MFU against a matrix-multiply peak measured in this
process with the same dtype, evaluation tokens/s (forward only, inference mode) on a --eval-batch x seq_len batch
(default: the training batch) and on one sequence of --eval-mult x seq_len tokens, compile time and peak memory.
Cases (and, with --ref, the same schemes built from another checkout of the package, labelled ``@ref``) are timed
in interleaved rounds so that slow phases of a shared machine hit them all alike; figures are medians over rounds,
with the min-max spread. On a CPU shared with other jobs, also try --threads 1,2: every kernel ends in a thread
barrier, and a preempted OpenMP thread turns each barrier into a scheduler time slice.

Ours in several variants (--ours LOSS:SCOPE,...): LOSS is the model's cross-entropy kernel
(TransformerLM.loss_impl), SCOPE what runtime.compile_model compiles; ``auto`` is each device's choice, and
auto:auto keeps the bare scheme name (else ``rope[plain:blocks]+compile``; without compile SCOPE does not apply:
``rope[plain]``). Peers (--peer; scripts/benchmark_peers.py) are other implementations at the same shape, batch and
autocast in the same rounds: nanoGPT's model.py from a checkout you name, and transformers' Llama; every case is
then set against each peer (the ``ratios``: paired tokens/s, compile time, memory). A peer has no long evaluation
(nanoGPT's position table ends at seq_len), like pos=learned.

Compile time, comparable across cases: ``first_steps_s`` is the wall time of building (and compiling) a case and
running its first --warmup training steps, with nothing of that case before them; ``warmup_s`` adds its evaluation
warm-up. A tiny compiled step before the first case keeps the process's one-off compiler start-up out of it.
--fresh-cache points TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at a new empty folder before each case is built,
so that no case reads compiled kernels from another's (or an earlier run's) folder. What torch keeps in the process's
memory stays: dynamo's traced frames (a second model of ours reuses the block graph an earlier one compiled) and
inductor's kernels. So only the first compile of each piece of code is cold (``cold`` in the rows; peers are built
first); a cold figure for every variant takes one run per variant.

Peak memory, comparable although every case stays resident: on CUDA, ``step_extra_mb`` is the allocator peak of one
training step above what was allocated just before it, ``state_mb`` the case's parameters and optimizer state, and
``peak_train_mem_mb`` their sum; on a CPU these are None, and the process's peak resident set is printed once.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from benchmark_peers import ADAMW, PEERS, Built, adamw, fmt_ratios, parse_peer, ratios, state_bytes

import roformer.model as model_now
import roformer.positional as positional_now
from roformer.files import atomic_write
from roformer.kernels import LOSS_IMPLS
from roformer.positional import SCHEMES
from roformer.runtime import COMPILE_SCOPE_BY_DEVICE, COMPILE_SCOPES, compile_model, keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, dtype: str):
    return nullcontext() if dtype == "fp32" else torch.autocast(device, dtype=DTYPES[dtype])


def matmul_peak(device: str, dtype: str, n: int, reps: int = 5) -> float:
    """Median FLOP/s of an n x n x n matrix multiply in the given dtype (inputs already in that dtype)."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _roformer_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "roformer" or k.startswith("roformer.")}


def load_ref(path: str):
    """(model, positional) modules of the ``roformer`` package in another checkout, imported beside this one.

    Only these two are asked for by name; whatever ``roformer.model`` imports comes along from the same checkout
    (``roformer.kernels`` once the kernels left model.py; older checkouts hold them in model.py), so old and new
    checkouts load alike. Every module imported here must come from ``path``: a path without the
    package would otherwise silently load this checkout again and time it against itself.
    """
    root = Path(path).resolve()
    saved = _roformer_modules()
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        code = importlib.import_module("roformer.model"), importlib.import_module("roformer.positional")
        where = {k: m.__file__ or next(iter(m.__path__)) for k, m in _roformer_modules().items()}  # namespace pkg
        stray = sorted(k for k, f in where.items() if root not in Path(f).resolve().parents)
        if stray:
            raise SystemExit(f"--ref {path}: {', '.join(stray)} did not come from there; give a checkout's root")
        return code
    finally:
        sys.path.remove(str(root))
        for k in _roformer_modules():
            del sys.modules[k]
        sys.modules.update(saved)


def build(args, scheme: str, device: str, compile_: bool, code, loss: str, scope: str | None) -> Built:
    """Ours: TransformerLM from ``code`` with the cross-entropy kernel ``loss`` and, when compiled, ``scope``."""
    mod, posmod = code
    torch.manual_seed(0)
    mcfg = mod.ModelConfig(
        vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, attention=args.attention
    )
    model = mod.TransformerLM(mcfg, posmod.PosConfig(name=scheme, max_len=args.seq_len)).to(device)
    if loss != "auto":
        if not hasattr(model, "loss_impl"):  # an older --ref checkout
            raise SystemExit(f"--ours {loss}:{scope}: the --ref checkout's model has no loss_impl; use auto:SCOPE")
        model.loss_impl = loss
    auto_scope = COMPILE_SCOPE_BY_DEVICE.get(torch.device(device).type, "model")
    if compile_ and (scope if scope != "auto" else auto_scope) == "blocks" and not hasattr(model, "head"):
        raise SystemExit(f"--ours {loss}:{scope}: the --ref checkout's model has no head() to compile by blocks "
                         f"(auto: blocks on {device}); use {loss}:model")  # fmt: skip
    # RoPE's cos/sin cache grows on demand, and a compiled training step recompiles when it changes: grow it now to
    # the long evaluation's length (on the device the inputs will name: the cache is keyed on it), before compiling
    grow = getattr(model.pos, "cos_sin", None)
    if grow is not None:
        grow(args.seq_len * args.eval_mult, next(model.parameters()).device)
    opt = adamw(model, args.optimizer)
    fwd = compile_model(model, scope=scope, mode=args.compile_mode) if compile_ else model
    return Built(model, opt, loss=lambda x, y: fwd(x, y)[1], forward=fwd,
                 flops_per_token=model.flops_per_token(args.seq_len), long_eval=True)  # fmt: skip


def train_step(b: Built, x, y, device, dtype):
    with autocast(device, dtype):
        loss = b.loss(x, y)
    loss.backward()
    b.opt.step()
    b.opt.zero_grad(set_to_none=True)


def eval_step(b: Built, x, device, dtype):
    with torch.inference_mode(), autocast(device, dtype):
        b.forward(x)


def time_call(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def spread(times: list[float], n: int) -> tuple[float, float, float]:
    """tokens/s: median, min, max over the timed calls of n tokens each."""
    return n / statistics.median(times), n / max(times), n / min(times)


def plan(args, compiles: list[bool], device: str, codes: dict) -> dict[str, dict]:
    """Every case of one set of rounds, by display name, in the order they are built: each peer per compile
    setting, then ours per (code, compile, scheme, --ours spec). Each holds its identity fields and ``make``, which
    builds it, and ``cold``: whether its compile can be compared as a cold one. In one process only the first
    compile of a piece of code is: dynamo keeps its traced frames (a second model of ours reuses the block graph a
    first one compiled) and inductor its kernels in memory, which --fresh-cache does not reach. So peers come first
    (no code shared with ours) and, of ours, the first compiled case of each checkout is the cold one; the later
    ones' first_steps_s is a lower bound (cold figures for each: one run per variant)."""
    cases = {}
    for (peer, path), compile_ in itertools.product(args.peer, compiles):
        name = peer + ("+compile" if compile_ else "")
        cases[name] = dict(scheme=name, pos=None, code=None, peer=peer, compile=compile_, loss=None, scope=None,
                           cold=True, make=functools.partial(PEERS[peer], args, device, compile_, path))  # fmt: skip
    seen: set[str] = set()
    for (label, code), compile_, s, (loss, scope) in itertools.product(codes.items(), compiles, args.schemes,
                                                                        args.ours):  # fmt: skip
        if args.attention == "linear" and not SCHEMES[s].supports_linear:
            continue
        scope = scope if compile_ else None  # nothing to scope without compile: specs differing only there are one
        name = s if label == "now" else f"{s}@{label}"
        if (loss, scope) not in (("auto", "auto"), ("auto", None)):  # the default keeps the bare scheme name
            name += f"[{loss}:{scope}]" if scope else f"[{loss}]"
        name += "+compile" if compile_ else ""
        if name in cases:
            continue
        cold = not compile_ or label not in seen
        seen |= {label} if compile_ else set()
        cases[name] = dict(scheme=name, pos=s, code=label, peer=None, compile=compile_, loss=loss, scope=scope,
                           cold=cold, make=functools.partial(build, args, s, device, compile_, code, loss, scope))
    return cases


def warm_up(args, c: dict, inp, tgt, ev_x, long_x, device, dtype, fresh: str | None) -> None:
    """Build the case, then its training warm-up (timed alone: first_steps_s), then its evaluation warm-up."""
    if fresh:  # read when inductor and triton next look for a cache folder: this case's compiles start cold
        folder = tempfile.mkdtemp(dir=fresh)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    sync(device)
    t0 = time.perf_counter()
    b = c["built"] = c.pop("make")()
    for _ in range(args.warmup):
        train_step(b, inp, tgt, device, dtype)
    sync(device)
    c["first_s"] = time.perf_counter() - t0  # with compile: mostly compile time
    c["long_ok"] = b.long_eval
    if b.long_eval:
        try:
            eval_step(b, long_x, device, dtype)
        except ValueError:  # PositionOutOfRange (learned table), from either checkout
            c["long_ok"] = False
    for _ in range(args.warmup):
        eval_step(b, ev_x, device, dtype)
    sync(device)
    c["warm_s"] = time.perf_counter() - t0


def memory(b: Built, inp, tgt, device, dtype) -> dict:
    """CUDA: one training step's allocator peak above what was allocated before it, and this case's own state
    (parameters and optimizer state), so that cases compare although all of them are resident. CPU: None."""
    if device != "cuda":
        return {"step_extra_mb": None, "state_mb": None, "peak_train_mem_mb": None}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(b, inp, tgt, device, dtype)
    torch.cuda.synchronize()
    extra, state = (torch.cuda.max_memory_allocated() - base) / 2**20, state_bytes(b.model, b.opt) / 2**20
    return {"step_extra_mb": extra, "state_mb": state, "peak_train_mem_mb": state + extra}


def warm_machinery(device: str, compiled: bool) -> None:
    """One tiny training step, compiled when any case is, before the first case's clock starts: a process's first
    compile also imports inductor and starts its compile workers, which would count against whichever case is first."""
    layer = torch.nn.Linear(8, 8, device=device)
    (torch.compile(layer) if compiled else layer)(torch.ones(4, 8, device=device)).sum().backward()


def bench_case(args, dtype: str, compiles: list[bool], threads: int, device: str, peak: float, codes: dict,
               fresh: str | None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Time every case for one (dtype, threads) in interleaved rounds: (rows, ratios against each peer)."""
    torch.set_num_threads(threads)
    B, T, EB = args.batch, args.seq_len, args.eval_batch or args.batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (B, T + 1), generator=gen).to(device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # as a data loader gives them (nanoGPT views targets)
    ev_x = torch.randint(0, args.vocab, (EB, T), generator=gen).to(device)
    long_x = torch.randint(0, args.vocab, (1, T * args.eval_mult), generator=gen).to(device)
    pa = torch.randn(args.peak_n, args.peak_n, device=device, dtype=DTYPES[dtype])
    pb = torch.randn(args.peak_n, args.peak_n, device=device, dtype=DTYPES[dtype])
    cases = plan(args, compiles, device, codes)
    for c in cases.values():
        warm_up(args, c, inp, tgt, ev_x, long_x, device, dtype, fresh)
        c.update(train=[], eval=[], eval_long=[], peak=[])
    # Compiling leaves hundreds of thousands of Python objects behind: collect now, and keep the survivors out of
    # later collections, whose full passes over them (a fraction of a second each) would land in timed steps
    gc.collect()
    gc.freeze()
    for _ in range(args.rounds):
        for c in cases.values():
            b = c["built"]
            c["peak"].append(2 * args.peak_n**3 / time_call(lambda: pa @ pb, device))  # the peak of this moment
            c["train"].append(time_call(lambda b=b: train_step(b, inp, tgt, device, dtype), device))
            c["eval"].append(time_call(lambda b=b: eval_step(b, ev_x, device, dtype), device))
            if c["long_ok"]:
                c["eval_long"].append(time_call(lambda b=b: eval_step(b, long_x, device, dtype), device))
    rows = []
    for c in cases.values():
        flops = c["built"].flops_per_token
        tr = statistics.median(c["train"])
        tok, tok_min, tok_max = spread(c["train"], B * T)
        ev, ev_min, ev_max = spread(c["eval"], EB * T)
        row = {k: c[k] for k in ("scheme", "pos", "code", "peer", "loss", "scope", "compile", "cold")}
        row |= {
            "dtype": dtype,
            "threads": threads,
            "attention": args.attention,
            # nanoGPT's configure_optimizers picks its own: fused on CUDA
            "optimizer": args.optimizer if c["peer"] != "nanogpt" else "fused" if device == "cuda" else "default",
            "first_steps_s": c["first_s"],
            "warmup_s": c["warm_s"],
            "train_step_s": tr,
            "train_step_s_min": min(c["train"]),
            "train_step_s_max": max(c["train"]),
            "train_tok_s": tok,
            "train_tok_s_min": tok_min,
            "train_tok_s_max": tok_max,
            "flops_per_token": flops,
            "mfu": B * T * flops / tr / peak,
            "mfu_best": B * T * flops / min(c["train"]) / peak,
            # against a matmul timed just before each step: robust to the machine's load changing over the run
            "mfu_paired": statistics.median(B * T * flops / t / p for t, p in zip(c["train"], c["peak"], strict=True)),
            "peak_paired": statistics.median(c["peak"]),
            "eval_batch": EB,
            "eval_tok_s": ev,
            "eval_tok_s_min": ev_min,
            "eval_tok_s_max": ev_max,
            "eval_long_tok_s": spread(c["eval_long"], T * args.eval_mult)[0] if c["long_ok"] else None,
        }
        rows.append(row | memory(c["built"], inp, tgt, device, dtype))
    for r in rows:  # step time against nope (ours: same code, compile and variant), and the ratio of per-round times
        c = cases[r["scheme"]]
        same = (c["code"], c["compile"], c["loss"], c["scope"], "nope")
        ref = next((n for n, d in cases.items() if not d["peer"] and (d["code"], d["compile"], d["loss"], d["scope"],
                                                                      d["pos"]) == same), None)  # fmt: skip
        ref = ref if not c["peer"] else None
        r["step_vs_nope"] = r["train_step_s"] / statistics.median(cases[ref]["train"]) if ref else None
        r["step_vs_nope_paired"] = (
            statistics.median(a / b for a, b in zip(c["train"], cases[ref]["train"], strict=True)) if ref else None
        )
    return rows, ratios(rows, {n: c["train"] for n, c in cases.items()})


def fmt(rows: list[dict], peak: dict) -> str:
    w = max(16, *(len(r["scheme"]) + 2 for r in rows))
    head = (
        f"{'case':<{w}}{'dtype':<6}{'comp':<5}{'thr':>3}{'train tok/s':>12}{'(min-max)':>14}{'vs nope':>8}"
        f"{'MFU':>7}{'MFU*':>7}{'eval tok/s':>11}{'(min-max)':>17}{'eval@long':>10}{'eval/train':>11}"
        f"{'1st s':>7}{'mem MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        long = f"{r['eval_long_tok_s']:,.0f}" if r["eval_long_tok_s"] else "n/a"
        vs = f"{r['step_vs_nope_paired']:.3f}" if r["step_vs_nope_paired"] else "-"
        mem = f"{r['peak_train_mem_mb']:,.0f}" if r["peak_train_mem_mb"] else "-"
        tspread = f"{r['train_tok_s_min']:,.0f}-{r['train_tok_s_max']:,.0f}"
        espread = f"{r['eval_tok_s_min']:,.0f}-{r['eval_tok_s_max']:,.0f}"
        lines.append(
            f"{r['scheme']:<{w}}{r['dtype']:<6}{'on' if r['compile'] else 'off':<5}{r['threads']:>3}"
            f"{r['train_tok_s']:>12,.0f}{tspread:>14}{vs:>8}{100 * r['mfu']:>6.1f}%{100 * r['mfu_paired']:>6.1f}%"
            f"{r['eval_tok_s']:>11,.0f}{espread:>17}{long:>10}{r['eval_tok_s'] / r['train_tok_s']:>10.2f}x"
            f"{r['first_steps_s']:>6.1f}{' ' if r['cold'] else '*'}{mem:>8}"
        )
    lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    lines.append("MFU*: median over rounds of the step's FLOP/s over a matmul's FLOP/s timed just before it")
    lines.append("vs nope: median over rounds of (step time / nope's step time in the same round)")
    lines.append("1st s: build, compile and the first --warmup training steps (*: after another case compiled the "
                 "same code, a lower bound); mem MB (CUDA): state + a step's peak")  # fmt: skip
    return "\n".join(lines)


def parse_ours(value: str) -> list[tuple[str, str]]:
    """argparse type of --ours: LOSS:SCOPE[,LOSS:SCOPE...] -> [(loss, scope)]."""
    losses, scopes = ("auto", *LOSS_IMPLS), ("auto", *COMPILE_SCOPES)
    specs = [tuple(v.split(":")) for v in value.split(",") if v]
    bad = [":".join(s) for s in specs if len(s) != 2 or s[0] not in losses or s[1] not in scopes]
    if bad or not specs:
        raise argparse.ArgumentTypeError(f"{value}: {', '.join(bad) or 'nothing'} is not LOSS:SCOPE with LOSS in "
                                         f"{', '.join(losses)} and SCOPE in {', '.join(scopes)}")  # fmt: skip
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(sorted(SCHEMES)))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", default="off", help="off, on, or off,on")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="softmax", choices=["softmax", "linear"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=0, help="sequences per evaluation forward (default: --batch)")
    ap.add_argument("--eval-mult", type=int, default=16, help="long evaluation: one sequence of this x seq_len")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="timed steps per scheme (median reported)")
    ap.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--threads", default="0", help="torch threads, e.g. 1,2 (default 0: torch's choice)")
    ap.add_argument("--optimizer", default="default", choices=list(ADAMW), help="AdamW implementation")
    ap.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "default"],
        help="keep: glibc keeps freed memory, as training does (roformer/runtime.py); default: glibc's",
    )
    ap.add_argument("--ref", default="", help="another checkout of the package, timed alongside as scheme@ref")
    ap.add_argument("--ours", type=parse_ours, default=[("auto", "auto")], metavar="LOSS:SCOPE[,...]",
                    help=f"our variants: cross-entropy kernel (auto, {', '.join(LOSS_IMPLS)}) and compile scope "
                         f"(auto, {', '.join(COMPILE_SCOPES)}); default auto:auto, each device's choice")  # fmt: skip
    ap.add_argument("--peer", type=parse_peer, action="append", default=[], metavar="NAME[=PATH]",
                    help=f"another implementation timed alongside: {', '.join(PEERS)} (nanogpt=PATH: a nanoGPT "
                         "checkout or its model.py); repeatable")  # fmt: skip
    ap.add_argument("--fresh-cache", action="store_true",
                    help="each case compiles into new empty inductor and triton cache folders")  # fmt: skip
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; choose from {sorted(SCHEMES)}")
    args.peer = list(dict(args.peer).items())  # a peer named twice is timed once (the last path given)
    threads = [int(t) or torch.get_num_threads() for t in args.threads.split(",")]
    kept = args.malloc == "keep" and keep_freed_memory()
    codes = {"now": (model_now, positional_now)}
    if args.ref:
        codes["ref"] = load_ref(args.ref)
    args.peak_n = peak_n = args.peak_n or (8192 if args.device == "cuda" else 2048)
    print(
        f"device={args.device} threads={threads} torch={torch.__version__} "
        f"shape: vocab={args.vocab} d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} "
        f"seq_len={args.seq_len} batch={args.batch} optimizer={args.optimizer} malloc={'keep' if kept else 'default'}"
        + (f" ref={args.ref}" if args.ref else "")
        + "".join(f" peer={n}" + (f"={p}" if p else "") for n, p in args.peer),
        flush=True,
    )
    # every compiled model is a new guard set on the same code: allow more than torch's default 8 recompiles
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows, rats, peaks = [], [], {}
    warm_machinery(args.device, "on" in args.compile.split(","))
    with tempfile.TemporaryDirectory(prefix="benchmark-cache-") if args.fresh_cache else nullcontext() as fresh:
        for dtype in args.dtypes.split(","):
            torch.set_num_threads(max(threads))
            peaks[dtype] = matmul_peak(args.device, dtype, peak_n)
            for t in threads:  # compile settings are timed in the same rounds: their ratio is paired
                case, rs = bench_case(args, dtype, [c == "on" for c in args.compile.split(",")], t, args.device,
                                      peaks[dtype], codes, fresh)  # fmt: skip
                rows, rats = rows + case, rats + rs
                print(fmt(case, {dtype: peaks[dtype]}) + "\n" + fmt_ratios(rs), flush=True)
    print("\n" + fmt(rows, peaks) + "\n" + fmt_ratios(rats))
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        out = {"args": vars(args), "matmul_peak_flops": peaks, "rows": rows, "ratios": rats}
        atomic_write(args.json, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
