"""Generation speed: our KV-cached decoding, and the same model exported to Hugging Face ``generate``, side by side.

    python scripts/benchmark_generate.py                                 # random default model (model=small), CPU
    python scripts/benchmark_generate.py --ckpt /tmp/default_run         # a checkpoint, and its HF export
    python scripts/benchmark_generate.py --prompt-len 256 --new-tokens 256 --runs 5 --threads 2
    python scripts/benchmark_generate.py --ckpt /tmp/default_run --layout-ab   # + decoding through F.linear
    python scripts/benchmark_generate.py --ckpt /tmp/default_run --no-hf --runs 1 --profile 200   # where time goes
    python scripts/benchmark_generate.py --device cuda --vocab 50304 --d-model 768 --n-layer 12 --n-head 12 \\
        --dtype bf16 --prompt-len 128 --new-tokens 256 --runs 3 --json decode.json   # GPT-2 small on a GPU

Batch 1, greedy, no early stop: every run decodes exactly --new-tokens tokens after a --prompt-len token prompt.
Prints tokens/s as the median over --runs runs (min-max beside it), counting the new tokens over the wall time
of the whole call (prompt forward included, as ``generate`` does on both sides), and our decode-only rate.

Cases. Ours (``--decode``, a comma list of roformer.generation.DECODES): ``eager`` is ``decode_step`` (today's
path, the CPU default), ``static`` the static-cache step as Python, ``graph`` that step replayed as a CUDA graph,
``compile`` it under torch.compile(mode="reduce-overhead"), ``compile-graph`` it compiled and captured in a CUDA
graph of our own. Default: ``auto`` on a CPU (= eager), ``eager,graph,compile,compile-graph`` on CUDA. Hugging
Face's (``--hf-cases``): ``dynamic`` (its default cache), ``static`` (``cache_implementation="static"``: on CUDA
transformers then compiles the decoding forward itself, with mode="reduce-overhead"; the row says whether it did),
``static-eager`` (the static cache with ``disable_compile``). Default: ``dynamic`` on a CPU, ``dynamic,static`` on
CUDA.

Rounds: every case in turn, then the next round, so a shared machine's slow phases hit all alike. In the first
round a case first runs once untimed at the full length (its ``first_s``: compile, graph capture and warm-up;
``setup_s`` is that minus the median run). The cases that compile come last (transformers' static, then ours), and
the rows are written after every case, so a run cut short by a time limit keeps what it measured. A case that
fails is reported with its reason and the others go on. Greedy output: ``match`` is how many leading ids a case
shares with the first of ours (on a GPU in bf16, rounding differences may break a near tie after a while; in fp32
all should agree).

``--dtype bf16`` casts the weights (parameters only: RoPE and HF's rotary frequencies stay fp32) to bfloat16 on
both sides; no autocast. The Hugging Face side is our model as ``roformer.hf_export`` builds it: from a checkpoint
its export folder, loaded back; a random model (no checkpoint, so no tokenizer to export) in memory through
``hf_model_from_checkpoint`` with a stand-in one-token tokenizer. Its end-of-document id is unset, so both sides
decode exactly --new-tokens tokens. ``--json PATH`` writes ``{"meta": ..., "rows": [...]}``: per case ``case``
(side/name), ``path`` (what ran), ``tok_s`` (median) with min and max, ``decode_tok_s``, ``first_s``, ``setup_s``,
``match`` and ``ratio_vs_hf_<case>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from roformer import decoding  # noqa: E402
from roformer.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint  # noqa: E402
from roformer.files import atomic_write, to_plain  # noqa: E402
from roformer.generation import DECODES, decode_run, generate  # noqa: E402
from roformer.kernels import DecodeWeights  # noqa: E402
from roformer.model import KVCache, ModelConfig, TransformerLM  # noqa: E402
from roformer.positional import SCHEMES, PosConfig  # noqa: E402

HF_CASES = ("dynamic", "static", "static-eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours(model, prompt: list[int], new: int, decode: str = "auto") -> tuple[float, float, list[int]]:
    """(seconds for the whole call, seconds after the first new token, the ids) for ``new`` greedy tokens."""
    sync(model.wte.weight.device)
    t0 = time.perf_counter()
    it = generate(model, prompt, max_new_tokens=new, temperature=0.0, decode=decode)
    ids = [next(it)]
    t1 = time.perf_counter()
    ids.extend(it)  # every id is a host int: the call is over when the last one is here
    t2 = time.perf_counter()
    assert len(ids) == new, len(ids)
    return t2 - t0, t2 - t1, ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging  # noqa: PLC0415  (optional heavy dependency)

    hf_logging.set_verbosity_error()  # its length reminder: the export's max_position_embeddings is the training
    hf_logging.disable_progress_bar()  # length, and RoPE goes past it here exactly as ours does


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

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="bench_gen_") as tmp:  # the export is loaded, then deleted
        export(ckpt_path, Path(tmp) / "hf")
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval(), ""


def hf_model_in_memory(model: TransformerLM):
    """A random model as hf_export builds it, without a checkpoint on disk; or (None, reason). Export needs a
    tokenizer only for its end-of-document id: a one-token stand-in gives one."""
    try:
        import transformers  # noqa: F401  (optional heavy dependency)
        from tokenizers import Tokenizer, models  # noqa: PLC0415

        from roformer.data.tokenizer import EOD_TOKEN  # noqa: PLC0415
        from roformer.hf_export import hf_model_from_checkpoint  # noqa: PLC0415
    except ImportError as e:
        return None, f"cannot import what the export needs ({e})"
    quiet_transformers()
    tok = Tokenizer(models.WordLevel({EOD_TOKEN: 0}, unk_token=EOD_TOKEN))
    ckpt = {"format": FORMAT, "model_cfg": to_plain(model.cfg), "pos_cfg": to_plain(model.pos_cfg),
            "tokenizer_json": tok.to_str(), "model": model.state_dict()}
    try:
        hf, _ = hf_model_from_checkpoint(ckpt)
    except ValueError as e:  # a scheme without a Hugging Face equivalent
        return None, str(e)
    return hf, ""


def cast_params(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``model`` to ``device`` and cast its parameters (not its buffers) to ``dtype``: rotary frequencies and
    tables stay fp32 on both sides, as each computes its angles in fp32 from them."""
    model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


@torch.inference_mode()
def hf_generate(model, prompt: list[int], new: int, case: str = "dynamic") -> tuple[float, list[int]]:
    """(seconds, new ids) of one greedy ``generate`` call of ``case`` (HF_CASES)."""
    ids = torch.tensor([prompt], device=model.device)
    extra = {}
    if case in ("static", "static-eager"):
        extra["cache_implementation"] = "static"
    if case == "static-eager":
        extra["disable_compile"] = True
    sync(model.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         use_cache=True, pad_token_id=0, eos_token_id=None, **extra)
    sync(model.device)
    t = time.perf_counter() - t0
    assert out.shape[1] == len(prompt) + new, out.shape
    return t, out[0, len(prompt):].tolist()


@dataclass
class Case:
    """One thing to time: ours with a decode path, or Hugging Face's generate with a cache."""

    side: str  # roformer | transformers
    name: str  # the decode path or HF case
    rates: list[float] = field(default_factory=list)  # new tokens / s of each timed run
    decode_rates: list[float] = field(default_factory=list)  # ours: after the first token
    first_s: float | None = None
    ids: list[int] | None = None
    path: str = ""  # what actually ran
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.side}/{self.name}"


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} tokens/s (min {min(xs):.1f}, max {max(xs):.1f}, {len(xs)} runs)"


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def parse_list(text: str, allowed, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"error: {flag}={text!r}: choose a comma list of {list(allowed)}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint file or run folder (default: a random model of the shape flags)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the weights' dtype on both sides (cast, no autocast)")
    ap.add_argument("--decode", help=f"our decode paths to time, a comma list of {list(DECODES)} "
                                     "(default: auto on cpu, eager,graph,compile,compile-graph on cuda)")
    ap.add_argument("--hf-cases", help=f"transformers cases, a comma list of {list(HF_CASES)} "
                                       "(default: dynamic on cpu, dynamic,static on cuda)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    # a random model's shape (default: configs/model/small, today's default model); ignored with --ckpt
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    ap.add_argument("--n-layer", type=int, default=ModelConfig.n_layer)
    ap.add_argument("--n-head", type=int, default=ModelConfig.n_head)
    ap.add_argument("--pos", choices=sorted(SCHEMES), default="rope", help="a random model's positional scheme")
    ap.add_argument("--json", metavar="PATH", help="write the rows here (after every case and round)")
    ap.add_argument("--layout-ab", action="store_true",
                    help="also time our decoding with the (out, in) weights through F.linear (CPU)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N decoding steps after the prompt with torch.profiler and print the top ops")
    a = ap.parse_args()
    # our decoders say what they built, and a graph or compile that fails to build why, through logging
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("roformer").addHandler(handler)
    logging.getLogger("roformer").setLevel(logging.INFO)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    cuda = device.type == "cuda"
    decodes = parse_list(a.decode or ("eager,graph,compile,compile-graph" if cuda else "auto"), DECODES,
                         "--decode")
    hf_cases = [] if a.no_hf else parse_list(a.hf_cases or ("dynamic,static" if cuda else "dynamic"), HF_CASES,
                                             "--hf-cases")
    if a.ckpt:
        model = model_from_checkpoint(load_checkpoint(a.ckpt))
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layer=a.n_layer, n_head=a.n_head)
        max_len = max(1024, a.prompt_len + a.new_tokens)  # a learned table that holds the run
        model = TransformerLM(cfg, PosConfig(name=a.pos, max_len=max_len)).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.cfg.vocab_size, (a.prompt_len,), generator=g).tolist()
    hf, why = None, "--no-hf"
    if hf_cases:  # built from our fp32 weights before they are cast
        try:
            hf, why = hf_model(a.ckpt) if a.ckpt else hf_model_in_memory(model)
        except Exception as e:  # an export that fails skips the HF side, not the run
            hf, why = None, one_line(e)
    if hf is not None:
        cast_params(hf, device, dtype).eval()
        hf.generation_config.eos_token_id = None  # decode exactly --new-tokens tokens, as ours does
    cast_params(model, device, dtype)
    n = a.new_tokens
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, pos={model.pos_cfg.name}, vocab "
          f"{model.cfg.vocab_size}, d_model {model.cfg.d_model}, {model.cfg.n_layer} layers, {model.cfg.n_head} "
          f"heads; batch 1, {a.prompt_len}-token prompt, {n} new tokens, greedy, {a.device} {a.dtype} weights, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if cuda else ""), flush=True)

    cases = [Case("roformer", d) for d in decodes]
    if hf is not None:
        cases += [Case("transformers", c) for c in hf_cases]
    meta = dict(device=a.device, gpu=torch.cuda.get_device_name(device) if cuda else None, dtype=a.dtype,
                params=model.num_params(), pos=model.pos_cfg.name, vocab=model.cfg.vocab_size,
                d_model=model.cfg.d_model, n_layer=model.cfg.n_layer, n_head=model.cfg.n_head,
                prompt_len=a.prompt_len, new_tokens=n, runs=a.runs, torch=torch.__version__,
                transformers=_version("transformers"), hf=None if hf is None else type(hf).__name__,
                hf_skipped=None if hf is not None else why)

    def run(case: Case, new: int) -> tuple[float, float | None, list[int]]:
        if case.side == "roformer":
            return ours(model, prompt, new, case.name)
        t, ids = hf_generate(hf, prompt, new, case.name)
        return t, None, ids

    def save() -> None:
        if a.json:
            rows = table(cases, meta)
            atomic_write(a.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    # Rounds: each case in turn, then the next round, so that a shared machine's slow phases hit all alike. In the
    # first round a case first runs once untimed at the full length: its compile or capture happens there (a
    # shorter warm-up would size the static caches smaller and make the first timed run build them again). The
    # cases that compile come last, and the rows are written after every case, so a run cut short by a time limit
    # still has the cheap cases timed.
    cases.sort(key=lambda c: compiles(c, cuda))
    if a.layout_ab:
        ours(model, prompt, 1, "eager")
    linear = []
    for r in range(a.runs):
        for case in cases:
            if case.error:
                continue
            try:
                if r == 0:
                    t0 = time.perf_counter()
                    _, _, case.ids = run(case, n)
                    case.first_s = time.perf_counter() - t0
                    case.path = describe(case, model, hf)
                    print(f"  ready {case.label:28s} first call {case.first_s:6.2f} s  ({case.path})", flush=True)
                t, d, ids = run(case, n)
            except Exception as e:  # one failing case must not lose the others
                case.error = one_line(e)
                print(f"  FAILED {case.label}: {case.error}", flush=True)
                save()
                continue
            case.rates.append(n / t)
            if d is not None and n > 1:
                case.decode_rates.append((n - 1) / d)
            case.ids = ids
            save()
        if a.layout_ab:  # the same decoding with nn.Linear's (out, in) weights through F.linear
            DecodeWeights.transpose_on_cpu = False
            model.drop_decode_weights()
            linear.append(n / ours(model, prompt, n, "eager")[0])
            DecodeWeights.transpose_on_cpu = True
            model.drop_decode_weights()
            ours(model, prompt, 1, "eager")  # rebuild the copies outside the timed runs, as the warm-up did
    report(cases, linear, hf, why)
    save()
    if a.profile:
        profile_decoding(model, prompt, a.profile)


def compiles(case: Case, cuda: bool) -> int:
    """The order of the cases: 0 without a compile, 1 transformers' static cache on CUDA (it compiles), 2 and 3
    our compiled steps (the second reuses much of the first's compile)."""
    if case.side == "roformer":
        return {"compile": 2, "compile-graph": 3}.get(case.name, 0)
    return 1 if cuda and case.name == "static" else 0


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(package)
    except Exception:
        return None


def describe(case: Case, model, hf) -> str:
    """What a case ran as, after its first call: our decoding path (and why not the one asked for), or whether
    transformers compiled."""
    if case.side == "roformer":
        path = decoding.last_path(model) or "?"
        run = path.removeprefix("static:")
        dec = decoding.registered(model, run) if path.startswith("static:") else None
        text = path + (f", build {dec.build_s:.2f} s" if dec is not None else "")
        asked = decode_run(case.name, model.wte.weight.device)
        if asked is not None and asked in decoding.failures(model):
            text += f"; run={asked} failed: {decoding.failures(model)[asked]}"
        return text
    if case.name == "static":
        compiled = hasattr(hf, "_compiled_call")
        return "static cache, " + ("compiled by transformers" if compiled else "not compiled")
    return {"dynamic": "dynamic cache", "static-eager": "static cache, disable_compile"}[case.name]


def table(cases: list[Case], meta: dict) -> list[dict]:
    """One row per case: identity as fields, the medians, and the ratios of ours to each HF case."""
    ref = next((c for c in cases if c.side == "roformer" and c.ids), None)
    med = {c.label: statistics.median(c.rates) for c in cases if c.rates}
    rows = []
    for c in cases:
        row = dict(case=c.label, side=c.side, decode=c.name, path=c.path, dtype=meta["dtype"],
                   device=meta["device"], runs=len(c.rates), error=c.error or None, first_s=c.first_s)
        if c.rates:
            row.update(tok_s=med[c.label], tok_s_min=min(c.rates), tok_s_max=max(c.rates),
                       setup_s=None if c.first_s is None else max(0.0, c.first_s - meta["new_tokens"] / med[c.label]))
        if c.decode_rates:
            row["decode_tok_s"] = statistics.median(c.decode_rates)
        if c.ids is not None and ref is not None:
            row["match_ref"], row["match"] = ref.label, _leading_equal(c.ids, ref.ids)
        if c.side == "roformer" and c.label in med:
            for hf_name in HF_CASES:
                other = f"transformers/{hf_name}"
                if other in med:
                    row[f"ratio_vs_hf_{hf_name.replace('-', '_')}"] = med[c.label] / med[other]
        rows.append(row)
    return rows


def _leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(cases: list[Case], linear: list[float], hf, why: str) -> None:
    ours_cases = [c for c in cases if c.side == "roformer"]
    hf_cases = [c for c in cases if c.side == "transformers"]
    single = len(ours_cases) == 1 and len(hf_cases) <= 1
    ref = next((c for c in ours_cases if c.ids), None)
    def line(side: str, pad: str, c: Case, where: str) -> bool:
        """The case's generate line (or its failure); whether it has rates."""
        tag = "" if single else f" [{c.name}]"
        if not c.rates:
            print(f"{side} generate{tag}  FAILED: {c.error or 'no runs'}")
        else:
            print(f"{side} generate{tag}{pad}{fmt(c.rates)}  {where}")
        return bool(c.rates)

    for c in ours_cases:
        if line("roformer", "      ", c, c.path) and c.decode_rates:
            print(f"roformer decode only{'' if single else f' [{c.name}]'}   {fmt(c.decode_rates)}")
    if linear and ours_cases and ours_cases[0].rates:
        print(f"roformer, F.linear     {fmt(linear)}  (weights as nn.Linear holds them: "
              f"{statistics.median(ours_cases[0].rates) / statistics.median(linear):.2f}x slower)")
    if hf is None:
        print(f"transformers generate  skipped: {why}")
    for c in hf_cases:
        line("transformers", "  ", c, f"({type(hf).__name__}, {c.path})")
    for c in cases:
        if c.ids is not None and ref is not None and c is not ref:
            print(f"greedy ids: {c.label} equals {ref.label} for the first {_leading_equal(c.ids, ref.ids)} of "
                  f"{len(ref.ids)}")
    for o in ours_cases:
        for h in hf_cases:
            if o.rates and h.rates:
                r = statistics.median(o.rates) / statistics.median(h.rates)
                name = "ratio roformer / transformers" if single else f"ratio {o.label} / {h.label}"
                print(f"{name}: {r:.2f}x")


@torch.inference_mode()
def profile_decoding(model, prompt: list[int], steps: int) -> None:
    """Where one decoding step's time goes: operators by self CPU time over ``steps`` steps after the prompt."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    dev = model.wte.weight.device
    cache = KVCache(capacity=len(prompt) + steps + 8)
    logits, _ = model(torch.tensor([prompt], device=dev), cache=cache)
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
