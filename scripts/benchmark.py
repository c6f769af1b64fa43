"""Throughput benchmark: training and evaluation speed of each positional scheme, MFU against a measured peak.

    python scripts/benchmark.py                                  # reference CPU shape, every scheme, fp32+bf16
    python scripts/benchmark.py --schemes rope,nope --dtypes bf16 --compile off,on --json bench.json
    python scripts/benchmark.py --device cuda --vocab 50304 --d-model 768 --n-layer 12 --n-head 12 \\
        --seq-len 1024 --batch 16 --dtypes bf16 --compile on --schemes rope,nope --optimizer fused
                                                                 # GPT-2 small on a GPU (issue 7 target: MFU >= 45%)
    git worktree add /tmp/roformer-before 7700ad6                # an older checkout of the package ...
    python scripts/benchmark.py --ref /tmp/roformer-before --schemes rope,nope --dtypes bf16 --threads 1,2
                                                                 # ... timed in the same rounds as this one

Per (dtype, compile, scheme): training tokens/s for a full step (forward, backward, AdamW step), model FLOPs per
token (6 N + 12 n_layer seq_len d_model), MFU against a matrix-multiply peak measured in this process with the
same dtype, evaluation tokens/s (forward only, inference mode) on a --eval-batch x seq_len batch (default: the
training batch) and on one sequence of --eval-mult x seq_len tokens, and peak memory (CUDA: allocator peak of a
training step per case; CPU: the process's peak resident set, once).
Schemes (and, with --ref, the same schemes built from another checkout of the package, labelled ``@ref``) are
timed in interleaved rounds so that slow phases of a shared machine hit them all alike; figures are medians over
rounds, with the min-max spread. On a CPU shared with other jobs, also try --threads 1,2: every kernel ends in a
thread barrier, and a preempted OpenMP thread turns each barrier into a scheduler time slice.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import roformer.model as model_now
import roformer.positional as positional_now
from roformer.files import atomic_write
from roformer.positional import SCHEMES
from roformer.runtime import keep_freed_memory

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


def build(args, scheme: str, device: str, compile_: bool, code):
    mod, posmod = code
    torch.manual_seed(0)
    mcfg = mod.ModelConfig(
        vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, attention=args.attention
    )
    model = mod.TransformerLM(mcfg, posmod.PosConfig(name=scheme, max_len=args.seq_len)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
    opt = torch.optim.AdamW(groups, lr=1e-4, **impl[args.optimizer])
    fwd = torch.compile(model, mode=args.compile_mode) if compile_ else model
    return model, fwd, opt


def train_step(fwd, opt, x, y, device, dtype):
    with autocast(device, dtype):
        _, loss = fwd(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def eval_step(fwd, x, device, dtype):
    with torch.inference_mode(), autocast(device, dtype):
        fwd(x)


def time_call(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def spread(times: list[float], n: int) -> tuple[float, float, float]:
    """tokens/s: median, min, max over the timed calls of n tokens each."""
    return n / statistics.median(times), n / max(times), n / min(times)


def bench_case(args, dtype: str, compiles: list[bool], threads: int, device: str, peak: float, codes: dict
               ) -> list[dict]:  # fmt: skip
    """Time every (code, compile, scheme) for one (dtype, threads) in interleaved rounds."""
    torch.set_num_threads(threads)
    B, T, EB = args.batch, args.seq_len, args.eval_batch or args.batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (B, T + 1), generator=gen).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    ev_x = torch.randint(0, args.vocab, (EB, T), generator=gen).to(device)
    long_x = torch.randint(0, args.vocab, (1, T * args.eval_mult), generator=gen).to(device)
    pa = torch.randn(args.peak_n, args.peak_n, device=device, dtype=DTYPES[dtype])
    pb = torch.randn(args.peak_n, args.peak_n, device=device, dtype=DTYPES[dtype])
    cases = {}
    for (label, code), compile_, s in itertools.product(codes.items(), compiles, args.schemes):
        if args.attention == "linear" and not SCHEMES[s].supports_linear:
            continue
        t0 = time.perf_counter()
        model, fwd, opt = build(args, s, device, compile_, code)
        try:  # first: it grows RoPE's cos/sin cache, which would make a compiled training step recompile later
            eval_step(fwd, long_x, device, dtype)
            long_ok = True
        except ValueError:  # PositionOutOfRange (learned table), from either checkout
            long_ok = False
        for _ in range(args.warmup):
            train_step(fwd, opt, inp, tgt, device, dtype)
            eval_step(fwd, ev_x, device, dtype)
        warm_s = time.perf_counter() - t0  # with compile: mostly compile time
        name = (s if label == "now" else f"{s}@{label}") + ("+compile" if compile_ else "")
        cases[name] = dict(scheme=s, code=label, compile=compile_, model=model, fwd=fwd, opt=opt, long_ok=long_ok,
                           warm_s=warm_s, train=[], eval=[], eval_long=[], peak=[])  # fmt: skip
    for _ in range(args.rounds):
        for c in cases.values():
            c["peak"].append(2 * args.peak_n**3 / time_call(lambda: pa @ pb, device))  # the peak of this moment
            c["train"].append(time_call(lambda c=c: train_step(c["fwd"], c["opt"], inp, tgt, device, dtype), device))
            c["eval"].append(time_call(lambda c=c: eval_step(c["fwd"], ev_x, device, dtype), device))
            if c["long_ok"]:
                c["eval_long"].append(time_call(lambda c=c: eval_step(c["fwd"], long_x, device, dtype), device))
    rows = []
    for name, c in cases.items():
        flops = c["model"].flops_per_token(T)
        tr = statistics.median(c["train"])
        tok, tok_min, tok_max = spread(c["train"], B * T)
        ev, ev_min, ev_max = spread(c["eval"], EB * T)
        row = {
            "scheme": name,
            "code": c["code"],
            "dtype": dtype,
            "compile": c["compile"],
            "threads": threads,
            "attention": args.attention,
            "optimizer": args.optimizer,
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
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(c["fwd"], c["opt"], inp, tgt, device, dtype)
            row["peak_train_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    for r in rows:  # step time against nope (same code and compile setting), and the ratio of per-round times
        c = cases[r["scheme"]]
        peer = (c["code"], c["compile"], "nope")
        ref = next((n for n, d in cases.items() if (d["code"], d["compile"], d["scheme"]) == peer), None)
        r["step_vs_nope"] = r["train_step_s"] / statistics.median(cases[ref]["train"]) if ref else None
        r["step_vs_nope_paired"] = (
            statistics.median(a / b for a, b in zip(c["train"], cases[ref]["train"], strict=True)) if ref else None
        )
    return rows


def fmt(rows: list[dict], peak: dict) -> str:
    head = (
        f"{'scheme':<16}{'dtype':<6}{'comp':<5}{'thr':>3}{'train tok/s':>12}{'(min-max)':>14}{'vs nope':>8}"
        f"{'MFU':>7}{'MFU*':>7}{'eval tok/s':>11}{'(min-max)':>15}{'eval@long':>10}{'eval/train':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        long = f"{r['eval_long_tok_s']:,.0f}" if r["eval_long_tok_s"] else "n/a"
        vs = f"{r['step_vs_nope_paired']:.3f}" if r["step_vs_nope_paired"] else "-"
        tspread = f"{r['train_tok_s_min']:,.0f}-{r['train_tok_s_max']:,.0f}"
        espread = f"{r['eval_tok_s_min']:,.0f}-{r['eval_tok_s_max']:,.0f}"
        lines.append(
            f"{r['scheme']:<16}{r['dtype']:<6}{'on' if r['compile'] else 'off':<5}{r['threads']:>3}"
            f"{r['train_tok_s']:>12,.0f}{tspread:>14}{vs:>8}{100 * r['mfu']:>6.1f}%{100 * r['mfu_paired']:>6.1f}%"
            f"{r['eval_tok_s']:>11,.0f}{espread:>15}{long:>10}{r['eval_tok_s'] / r['train_tok_s']:>10.2f}x"
        )
    lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    lines.append("MFU*: median over rounds of the step's FLOP/s over a matmul's FLOP/s timed just before it")
    lines.append("vs nope: median over rounds of (step time / nope's step time in the same round)")
    return "\n".join(lines)


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
    ap.add_argument("--optimizer", default="default", choices=["default", "foreach", "fused", "loop"],
                    help="AdamW implementation")  # fmt: skip
    ap.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "default"],
        help="keep: glibc keeps freed memory, as training does (roformer/runtime.py); default: glibc's",
    )
    ap.add_argument("--ref", default="", help="another checkout of the package, timed alongside as scheme@ref")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; choose from {sorted(SCHEMES)}")
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
        + (f" ref={args.ref}" if args.ref else ""),
        flush=True,
    )
    # every compiled model is a new guard set on the same code: allow more than torch's default 8 recompiles
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows, peaks = [], {}
    for dtype in args.dtypes.split(","):
        torch.set_num_threads(max(threads))
        peaks[dtype] = matmul_peak(args.device, dtype, peak_n)
        for t in threads:  # compile settings are timed in the same rounds: their ratio is paired
            case = bench_case(args, dtype, [c == "on" for c in args.compile.split(",")], t, args.device,
                              peaks[dtype], codes)  # fmt: skip
            rows += case
            print(fmt(case, {dtype: peaks[dtype]}), flush=True)
    print("\n" + fmt(rows, peaks))
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        atomic_write(args.json, json.dumps({"args": vars(args), "matmul_peak_flops": peaks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
