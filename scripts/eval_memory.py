"""Peak resident memory of scoring one window of L tokens, per positional scheme (each in a fresh process).

    python scripts/eval_memory.py                     # default model shape, L = 8192, every scheme
    python scripts/eval_memory.py --length 16384 --schemes rope,alibi --bf16

The child builds the default CPU model (vocab 8192, d_model 256, 4 layers, 4 heads), scores one window with
roformer.evaluation.token_nll in inference mode, and reports its peak resident set (ru_maxrss) and the time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from roformer.positional import SCHEMES

CHILD = r"""
import json, resource, sys, time
import torch
from roformer.evaluation import token_nll
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig, PositionOutOfRange
scheme, L, bf16 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
model = TransformerLM(ModelConfig(), PosConfig(name=scheme)).eval()
x = torch.randint(0, 8192, (1, L + 1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
try:
    with torch.inference_mode():
        nll = token_nll(model, x[:, :-1], x[:, 1:], bf16)
    status = f"ok, mean nll {nll.mean().item():.3f}"
except PositionOutOfRange as e:
    status = f"n/a: {e}"
print(json.dumps({"scheme": scheme, "length": L, "status": status, "seconds": time.perf_counter() - t0,
                  "rss_before_mb": base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--schemes", default=",".join(sorted(SCHEMES)))
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    print(f"{'scheme':<11}{'length':>7}{'peak RSS (MB)':>15}{'seconds':>9}  status")
    for s in args.schemes.split(","):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, s, str(args.length), "1" if args.bf16 else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{s:<11}{r['length']:>7}{r['peak_rss_mb']:>15,.0f}{r['seconds']:>9.1f}  {r['status'][:70]}")


if __name__ == "__main__":
    main()
