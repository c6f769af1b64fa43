"""Profile one training step (forward, backward, AdamW step) with torch.profiler and print the top consumers.

    python scripts/profile_step.py                                 # reference CPU shape, rope, bf16 autocast
    python scripts/profile_step.py --scheme t5 --dtype fp32 --steps 3 --rows 30
    python scripts/profile_step.py --trace /tmp/step.json          # also a Chrome trace (chrome://tracing)

Prints three tables: operators by self CPU time (where the cycles are actually spent), operators by total time
(including their children, e.g. a whole ``aten::linear``), and the time per profiler region: ``forward`` (with
the loss), ``backward`` and ``optimizer``, so one can see at a glance which phase dominates. On a CPU shared with
other jobs use --threads 1: with two threads every kernel's barrier waits for a preempted thread, and the
profile then measures the scheduler. Profile another checkout with PYTHONPATH=/path/to/checkout.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from roformer.model import ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig
from roformer.runtime import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="rope", choices=sorted(SCHEMES))
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (tables are totals over them)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (default: torch's choice)")
    ap.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "default"],
        help="keep: glibc keeps freed memory, as training does (roformer/runtime.py); default: glibc's",
    )
    ap.add_argument("--trace", default="", help="write a Chrome trace here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()

    torch.manual_seed(0)
    model = TransformerLM(
        ModelConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model),
        PosConfig(name=args.scheme, max_len=args.seq_len),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=args.fused_adamw or None)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    inp, tgt = x[:, :-1], x[:, 1:]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    def step():
        with amp:
            with record_function("forward"):  # including the loss, as training computes it
                _, loss = model(inp, tgt)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    avg = prof.key_averages()
    print(f"scheme={args.scheme} dtype={args.dtype} threads={torch.get_num_threads()} steps={args.steps}")
    print("\n== by self CPU time ==")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    print("\n== by total CPU time ==")
    print(avg.table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    regions = {e.key: e.cpu_time_total for e in avg if e.key in ("forward", "backward", "optimizer")}
    total = sum(regions.values())
    print("\n== phases (ms per step, share) ==")
    for k in ("forward", "backward", "optimizer"):
        if k in regions:
            print(f"{k:<10}{regions[k] / 1e3 / args.steps:>9.1f} ms {100 * regions[k] / total:>6.1f}%")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
