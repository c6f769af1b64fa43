"""Throughput benchmark: training and evaluation speed of each positional scheme, MFU against a measured peak.

    python scripts/benchmark.py                                  # reference CPU shape, every scheme, fp32+bf16
    python scripts/benchmark.py --schemes rope,nope --dtypes bf16 --compile off,on --json bench.json
    python scripts/benchmark.py --device cuda --vocab 50304 --d-model 768 --n-layer 12 --n-head 12 \\
        --seq-len 1024 --batch 16 --dtypes bf16 --compile on       # GPT-2 small on a GPU

Per (dtype, compile, scheme): training tokens/s for a full step (forward, backward, AdamW step), model FLOPs per
token (6 N + 12 n_layer seq_len d_model), MFU against a matrix-multiply peak measured in this process with the
same dtype, evaluation tokens/s (inference mode, one sequence) at seq_len and at --eval-mult x seq_len, and
peak memory (CUDA: allocator peak of a training step per case; CPU: the process's peak resident set, once).
Schemes are timed in interleaved rounds so that slow phases of a shared machine hit them all alike; figures are
medians over rounds, with the min-max spread.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from contextlib import nullcontext

import torch

from roformer.model import ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig, PositionOutOfRange

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


def build(args, scheme: str, device: str, compile_: bool):
    torch.manual_seed(0)
    mcfg = ModelConfig(
        vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, attention=args.attention
    )
    model = TransformerLM(mcfg, PosConfig(name=scheme, max_len=args.seq_len)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-4)
    fwd = torch.compile(model) if compile_ else model
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


def bench_case(args, dtype: str, compile_: bool, device: str, peak: float) -> list[dict]:
    """Time every scheme for one (dtype, compile) in interleaved rounds."""
    B, T = args.batch, args.seq_len
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (B, T + 1), generator=gen).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    long_x = torch.randint(0, args.vocab, (1, T * args.eval_mult), generator=gen).to(device)
    cases = {}
    for s in args.schemes:
        if args.attention == "linear" and not SCHEMES[s].supports_linear:
            continue
        model, fwd, opt = build(args, s, device, compile_)
        for _ in range(args.warmup):
            train_step(fwd, opt, inp, tgt, device, dtype)
            eval_step(fwd, inp[:1], device, dtype)
        try:
            eval_step(fwd, long_x, device, dtype)
            long_ok = True
        except PositionOutOfRange:
            long_ok = False
        cases[s] = dict(model=model, fwd=fwd, opt=opt, long_ok=long_ok, train=[], eval=[], eval_long=[])
    for _ in range(args.rounds):
        for c in cases.values():
            c["train"].append(time_call(lambda c=c: train_step(c["fwd"], c["opt"], inp, tgt, device, dtype), device))
            c["eval"].append(time_call(lambda c=c: eval_step(c["fwd"], inp[:1], device, dtype), device))
            if c["long_ok"]:
                c["eval_long"].append(time_call(lambda c=c: eval_step(c["fwd"], long_x, device, dtype), device))
    rows = []
    for s, c in cases.items():
        flops = c["model"].flops_per_token(T)
        tr = statistics.median(c["train"])
        row = {
            "scheme": s,
            "dtype": dtype,
            "compile": compile_,
            "attention": args.attention,
            "train_step_s": tr,
            "train_step_s_min": min(c["train"]),
            "train_step_s_max": max(c["train"]),
            "train_tok_s": B * T / tr,
            "train_tok_s_min": B * T / max(c["train"]),
            "train_tok_s_max": B * T / min(c["train"]),
            "flops_per_token": flops,
            "mfu": B * T * flops / tr / peak,
            "eval_tok_s": T / statistics.median(c["eval"]),
            "eval_long_tok_s": T * args.eval_mult / statistics.median(c["eval_long"]) if c["long_ok"] else None,
        }
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train_step(c["fwd"], c["opt"], inp, tgt, device, dtype)
            row["peak_train_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    nope = next((r for r in rows if r["scheme"] == "nope"), None)
    for r in rows:
        r["step_vs_nope"] = r["train_step_s"] / nope["train_step_s"] if nope else None
    return rows


def fmt(rows: list[dict], peak: dict) -> str:
    head = (
        f"{'scheme':<11}{'dtype':<6}{'compile':<8}{'train tok/s':>12}{'(min-max)':>16}{'vs nope':>9}"
        f"{'MFU':>7}{'eval tok/s':>12}{'eval@long':>11}{'eval/train':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        long = f"{r['eval_long_tok_s']:,.0f}" if r["eval_long_tok_s"] else "n/a"
        vs = f"{r['step_vs_nope']:.3f}" if r["step_vs_nope"] else "-"
        spread = f"{r['train_tok_s_min']:,.0f}-{r['train_tok_s_max']:,.0f}"
        lines.append(
            f"{r['scheme']:<11}{r['dtype']:<6}{'on' if r['compile'] else 'off':<8}{r['train_tok_s']:>12,.0f}"
            f"{spread:>16}{vs:>9}{100 * r['mfu']:>6.1f}%"
            f"{r['eval_tok_s']:>12,.0f}{long:>11}{r['eval_tok_s'] / r['train_tok_s']:>10.2f}x"
        )
    lines.append("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(sorted(SCHEMES)))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", default="off", help="off, on, or off,on")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="softmax", choices=["softmax", "linear"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-mult", type=int, default=16, help="evaluation length as a multiple of seq_len")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="timed steps per scheme (median reported)")
    ap.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"--schemes: unknown {unknown}; choose from {sorted(SCHEMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_n = args.peak_n or (8192 if args.device == "cuda" else 2048)
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"shape: vocab={args.vocab} d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} "
        f"seq_len={args.seq_len} batch={args.batch}",
        flush=True,
    )
    rows, peaks = [], {}
    for dtype in args.dtypes.split(","):
        peaks[dtype] = matmul_peak(args.device, dtype, peak_n)
        for c in args.compile.split(","):
            rows += bench_case(args, dtype, c == "on", args.device, peaks[dtype])
            print(fmt(rows[-len(args.schemes) :], {dtype: peaks[dtype]}), flush=True)
    print("\n" + fmt(rows, peaks))
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "matmul_peak_flops": peaks, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
