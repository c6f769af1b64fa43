"""Generation speed: our KV-cached decoding, and the same model exported to Hugging Face ``generate``, side by side.

    python scripts/benchmark_generate.py                                 # random default model (model=small)
    python scripts/benchmark_generate.py --ckpt /tmp/default_run         # a checkpoint, and its HF export
    python scripts/benchmark_generate.py --prompt-len 256 --new-tokens 256 --runs 5 --threads 2
    python scripts/benchmark_generate.py --ckpt /tmp/default_run --layout-ab   # + decoding through F.linear
    python scripts/benchmark_generate.py --ckpt /tmp/default_run --no-hf --runs 1 --profile 200   # where time goes

Batch 1, greedy, no early stop: every run decodes exactly --new-tokens tokens after a --prompt-len token prompt.
Prints tokens/s as the median over --runs runs (min-max beside it), counting the new tokens over the wall time
of the whole call (prompt forward included, as ``generate`` does on both sides), and our decode-only rate.
The Hugging Face side needs ``transformers`` and ``roformer.hf_export.export`` and a checkpoint (a random model
has no tokenizer to export); without them it is skipped with a line saying why. Runs alternate between the two so a
shared machine's slow phases hit both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from roformer.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from roformer.generation import generate  # noqa: E402
from roformer.model import DecodeWeights, KVCache, ModelConfig, TransformerLM  # noqa: E402
from roformer.positional import PosConfig  # noqa: E402


def ours(model, prompt: list[int], new: int) -> tuple[float, float]:
    """(seconds for the whole call, seconds after the first new token) for ``new`` greedy tokens."""
    t0 = time.perf_counter()
    it = generate(model, prompt, max_new_tokens=new, temperature=0.0)
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    t2 = time.perf_counter()
    assert n == new, n
    return t2 - t0, t2 - t1


def hf_model(ckpt_path: str):
    """The exported model loaded back through transformers, or (None, reason)."""
    try:
        import transformers  # noqa: F401  (optional heavy dependency)
    except ImportError:
        return None, "transformers is not installed"
    try:
        from roformer.hf_export import export  # written separately; may be absent  # noqa: PLC0415
    except ImportError:
        return None, "roformer.hf_export.export does not exist"
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()  # its length reminder: the export's max_position_embeddings is the training
    hf_logging.disable_progress_bar()  # length, and RoPE goes past it here exactly as ours does
    with tempfile.TemporaryDirectory(prefix="bench_gen_") as tmp:  # the export is loaded, then deleted
        export(ckpt_path, Path(tmp) / "hf")
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval(), ""


@torch.inference_mode()
def hf_generate(model, prompt: list[int], new: int) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, use_cache=True, pad_token_id=0)
    t = time.perf_counter() - t0
    assert out.shape[1] == len(prompt) + new, out.shape
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint file or run folder (default: a random model of configs/model/small)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    ap.add_argument("--layout-ab", action="store_true",
                    help="also time our decoding with the (out, in) weights through F.linear (CPU)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N decoding steps after the prompt with torch.profiler and print the top ops")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ckpt:
        model = model_from_checkpoint(load_checkpoint(a.ckpt))
    else:
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(vocab_size=8192), PosConfig()).eval()  # model=small's shape, pos=rope
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.cfg.vocab_size, (a.prompt_len,), generator=g).tolist()
    hf, why = (None, "--no-hf") if a.no_hf else (None, "no --ckpt (a random model has no tokenizer to export)")
    if a.ckpt and not a.no_hf:
        hf, why = hf_model(a.ckpt)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, pos={model.pos_cfg.name}, vocab "
          f"{model.cfg.vocab_size}; batch 1, {a.prompt_len}-token prompt, {a.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    ours(model, prompt, 8)  # warm-up: allocator, kernels, RoPE tables
    if hf is not None:
        hf_generate(hf, prompt, 8)
    total, decode, linear, theirs = [], [], [], []
    for _ in range(a.runs):
        t, d = ours(model, prompt, a.new_tokens)
        total.append(a.new_tokens / t)
        decode.append((a.new_tokens - 1) / d)
        if a.layout_ab:  # the same decoding with nn.Linear's (out, in) weights through F.linear
            DecodeWeights.transpose_on_cpu = False
            model.drop_decode_weights()
            linear.append(a.new_tokens / ours(model, prompt, a.new_tokens)[0])
            DecodeWeights.transpose_on_cpu = True
            model.drop_decode_weights()
            ours(model, prompt, 1)  # rebuild the copies outside the timed runs, as the warm-up did
        if hf is not None:
            theirs.append(a.new_tokens / hf_generate(hf, prompt, a.new_tokens))

    def fmt(xs):
        return f"{statistics.median(xs):7.1f} tokens/s (min {min(xs):.1f}, max {max(xs):.1f}, {len(xs)} runs)"

    print(f"roformer generate      {fmt(total)}")
    print(f"roformer decode only   {fmt(decode)}")
    if linear:
        print(f"roformer, F.linear     {fmt(linear)}  (weights as nn.Linear holds them: "
              f"{statistics.median(total) / statistics.median(linear):.2f}x slower)")
    if hf is None:
        print(f"transformers generate  skipped: {why}")
    else:
        print(f"transformers generate  {fmt(theirs)}  ({type(hf).__name__})")
        print(f"ratio roformer / transformers: {statistics.median(total) / statistics.median(theirs):.2f}x")
    if a.profile:
        profile_decoding(model, prompt, a.profile)


@torch.inference_mode()
def profile_decoding(model, prompt: list[int], steps: int) -> None:
    """Where one decoding step's time goes: operators by self CPU time over ``steps`` steps after the prompt."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    cache = KVCache(capacity=len(prompt) + steps + 8)
    logits, _ = model(torch.tensor([prompt]), cache=cache)
    tok = logits[:, -1:].argmax(-1)
    for _ in range(8):  # warm-up (and the decoding copies of the weights)
        tok = model.decode_step(tok, cache)[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model.decode_step(tok, cache)[:, -1:].argmax(-1)
        wall = time.perf_counter() - t0
    print(f"\nprofile: {steps} decoding steps after {len(prompt)} tokens, {wall / steps * 1e3:.2f} ms per step "
          "under the profiler (which adds its own overhead per op)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
