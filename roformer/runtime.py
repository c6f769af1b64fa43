"""Where a process runs and how: device, precision, ranks, seeds and RNG state, compile, CPU memory.

* Device: ``auto`` is CUDA when available, else CPU (:func:`resolve_device`, shared by training and evaluation).
* Precision (``trainer.precision=auto``): on CUDA bf16 autocast when the GPU supports it, else fp16 autocast with
  a GradScaler; on CPU bf16 autocast when oneDNN reports native bf16 (AVX512-BF16 or AMX), else fp32. Weights,
  optimizer state, the loss and RoPE's angles stay fp32.
* Ranks (:func:`dist_env`): torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set; else, under SLURM (``srun``,
  or hydra/launcher=slurm with several tasks), ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, meeting at the
  first host of ``SLURM_JOB_NODELIST`` on a port derived from ``SLURM_JOB_ID`` (``MASTER_ADDR``/``MASTER_PORT`` win
  when set). Neither srun nor submitit sets torch's variables: submitit exports them only when a job calls
  ``submitit.helpers.TorchDistributedEnvironment().export()``. The process group is NCCL on CUDA, gloo on CPU.
  The ranks meet within ``ROFORMER_DIST_TIMEOUT`` seconds (default 300), else every live one stops with one line
  saying which variables it read and what to check; collectives keep torch's default timeout.
* CPU memory (:func:`keep_freed_memory`): glibc's malloc serves every block above its mmap threshold (at most
  32 MB) with a fresh ``mmap`` and unmaps it when the tensor dies. A CPU training step allocates and frees the
  same large tensors (logits, their gradient, activations) every time, and each comes back as new pages the
  kernel zero-fills on first touch. Raising the mmap and trim thresholds to 1 GB keeps freed blocks on malloc's
  free lists, where the next step finds them; the process's resident memory then does not shrink after its
  peak, which training and evaluation reach in their first steps anyway. PyTorch's CPU performance guide gets
  the same effect by preloading jemalloc or tcmalloc; this needs nothing installed. The measured effect (page
  faults and step time) is in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import random
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Precision(str, Enum):
    """Arithmetic of the forward/backward pass. Weights and optimizer state are always fp32."""

    # bf16 on CUDA when supported (else fp16); bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (CPU and CUDA)
    fp16 = "fp16"  # autocast to float16 with a GradScaler (CUDA only)


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: fp32
    use_scaler: bool = False  # fp16 on CUDA

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: Precision, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    precision = Precision(precision)
    if precision == Precision.auto:
        if device.type == "cuda":
            precision = Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
        else:
            precision = Precision.bf16 if cpu_has_fast_bf16() else Precision.fp32
    if precision == Precision.fp16 and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA (a GradScaler); on CPU use bf16 or fp32")
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision], (
        precision == Precision.fp16
    )


# trainer.compile=auto compiles on CUDA for runs of at least this many steps (trainer.max_steps, so that a resumed
# run decides as the original did): compiling takes about a minute there, which a few hundred faster steps repay.
# On CPU auto never compiles: it gained nothing measurable at the reference shape (docs/performance.md), and
# trainer.compile=true is there for whoever measures more.
COMPILE_MIN_STEPS_CUDA = 300


def resolve_compile(setting: str, device: torch.device, steps: int) -> bool:
    """Whether to torch.compile: ``true``/``false`` as given; ``auto``: on CUDA for runs of 300+ steps."""
    if setting != "auto":
        return setting == "true"
    return device.type == "cuda" and steps >= COMPILE_MIN_STEPS_CUDA


# What torch.compile covers on each device (trainer.compile_scope=auto): "model" traces the whole model as one graph;
# "blocks" compiles one transformer block, whose graph every block reuses, plus the head and loss apart
# (TransformerLM.head): dynamo traces a block once instead of n_layer times (compile times on a CPU in
# docs/performance.md), at the price of no fusion across block boundaries. cuda stays "model", the configuration
# measured on an H200 (issue 23), until a GPU times both in one run (scripts/gpu_check.py's benchmark step).
COMPILE_SCOPES = ("model", "blocks")
COMPILE_SCOPE_BY_DEVICE = {"cuda": "model", "cpu": "model"}


def compile_model(model: torch.nn.Module, scope: str = "auto", mode: str | None = None) -> torch.nn.Module:
    """``model`` under torch.compile: ``model`` scope returns the compiled wrapper; ``blocks`` compiles each block
    (and the head) in place and returns ``model`` itself, so its state_dict keys stay those of the bare model.
    ``auto``: the choice for the device the model is on (:data:`COMPILE_SCOPE_BY_DEVICE`)."""
    if scope == "auto":
        scope = COMPILE_SCOPE_BY_DEVICE.get(next(model.parameters()).device.type, "model")
    if scope == "model":
        return torch.compile(model, mode=mode)
    if scope != "blocks":
        raise ValueError(f"trainer.compile_scope={scope!r} must be auto, {' or '.join(COMPILE_SCOPES)}")
    # A block that reads its layer index (a per-layer bias table: pos=relative) is guarded on it and compiled once
    # per layer; let that happen rather than fall back to eager after torch's default of 8 recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(model.blocks) + 8)
    for block in model.blocks:
        block.compile(mode=mode)
    model.head = torch.compile(model.head, mode=mode)
    return model


def resolve_device(want: Device | str, key: str = "trainer.device", index: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error naming ``key``."""
    want = Device(want)
    if want == Device.cuda and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or auto")
    if want == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def setup_runtime(device: Device, precision: Precision, threads: int = 0) -> Runtime:
    """Find this process's rank (:func:`dist_env`), pick the device, join the process group (NCCL on CUDA, gloo
    on CPU; :func:`join_process_group`), set the thread count and resolve the precision."""
    env = dist_env()
    # a task may see every GPU of its node (index = local rank) or only its own (srun --gpus-per-task: index 0)
    index = env.local_rank % max(torch.cuda.device_count(), 1) if env.world_size > 1 else None
    dev = resolve_device(device, index=index)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        keep_freed_memory()
    if env.world_size > 1 and not dist.is_initialized():
        join_process_group(env, dev)
    if threads:
        torch.set_num_threads(threads)
    dtype, scaler = resolve_precision(precision, dev)
    return Runtime(dev, env.rank, env.local_rank, env.world_size, dtype, scaler)


# ----------------------------------------------------------------------------------------------------------
# Ranks: who this process is among its peers, and where they meet

DIST_TIMEOUT_VAR = "ROFORMER_DIST_TIMEOUT"
DIST_TIMEOUT_S = 300.0  # long enough for a slow node to start Python and import torch; a broken job stops in 5 min
# Ports for rank 0's store under SLURM: above the common service ports and below Linux's ephemeral range
# (32768-60999), where the kernel picks the local ports of outgoing connections and may already hold ours.
SLURM_PORTS = (15000, 32000)


class RendezvousError(ValueError):
    """The ranks did not meet (a one-line message naming the variables read and what to check)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a distributed run, and where its ranks meet."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"  # "torchrun" (RANK/WORLD_SIZE, from torchrun or any launcher), "slurm" or "single"


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address of this process, from ``environ`` (os.environ).

    * torchrun's variables win: ``WORLD_SIZE`` set -> ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
    * else several SLURM tasks (``SLURM_NTASKS`` > 1 and ``SLURM_PROCID`` set, as srun sets them in each task):
      rank ``SLURM_PROCID``, world size ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``; ``MASTER_ADDR`` (else the
      first host of ``SLURM_STEP_NODELIST`` or ``SLURM_JOB_NODELIST``) and ``MASTER_PORT`` (else
      :func:`slurm_port` of ``SLURM_JOB_ID``).
    * else one plain process (one SLURM task, or none).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE")
        source, rank_var, local_var, addr, port = "torchrun", "RANK", "LOCAL_RANK", env.get("MASTER_ADDR"), None
        if world > 1 and "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
    elif _env_int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        world = _env_int(env, "SLURM_NTASKS")
        source, rank_var, local_var = "slurm", "SLURM_PROCID", "SLURM_LOCALID"
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = env.get("MASTER_ADDR") or (expand_hostlist(nodes)[0] if nodes else None)
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
        else:
            port = slurm_port(_env_int(env, "SLURM_JOB_ID")) if "SLURM_JOB_ID" in env else None
    else:
        return DistEnv()
    if world <= 1:
        return DistEnv(source=source)
    rank, local_rank = _env_int(env, rank_var), _env_int(env, local_var, 0)
    if not 0 <= rank < world:
        raise ValueError(f"{rank_var}={rank} with world size {world}: a rank must be in [0, {world})")
    if addr is None or port is None:
        where = ("MASTER_ADDR and MASTER_PORT" if source == "torchrun" else
                 "SLURM_JOB_NODELIST and SLURM_JOB_ID (or MASTER_ADDR and MASTER_PORT)")
        raise ValueError(f"rank {rank} of {world} ({rank_var}) but no address to meet at: set {where}")
    return DistEnv(rank, world, local_rank, addr, port, source)


_HOSTLIST = re.compile(r"(?:[^,\[\]]|\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\])+")


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list, expanded in order: ``node[01-03,7]`` -> node01 node02 node03 node7,
    ``a1,b[2-3]`` -> a1 b2 b3, ``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2. Leading zeros of a range's start set the
    width, as in SLURM. (``scontrol show hostnames`` does this too, where scontrol is installed.)"""
    groups = _HOSTLIST.findall(spec.strip())
    if not spec.strip() or ",".join(groups) != spec.strip():
        raise ValueError(f"SLURM_JOB_NODELIST={spec!r} is not a SLURM host list (like node[01-03,7],gpu5)")
    hosts = []
    for group in groups:
        names = [""]
        for part in re.split(r"(\[[^\]]*\])", group):
            if part.startswith("["):
                names = [n + suffix for n in names for suffix in _expand_ranges(part[1:-1], spec)]
            else:
                names = [n + part for n in names]
        hosts += names
    return hosts


def _expand_ranges(ranges: str, spec: str) -> list[str]:
    out = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        if hi and int(hi) < int(lo):
            raise ValueError(f"SLURM_JOB_NODELIST={spec!r}: the range {item} runs backwards")
        out += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_port(job_id: int) -> int:
    """Rank 0's port for SLURM job ``job_id``: the same in every task, different for jobs up to 17,000 ids apart
    (so for the jobs of one sweep sharing a node). Two srun steps of one job running at once need MASTER_PORT."""
    lo, hi = SLURM_PORTS
    return lo + job_id % (hi - lo)


def rendezvous_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds the ranks wait for each other at the start: ``ROFORMER_DIST_TIMEOUT``, default 300."""
    value = (os.environ if environ is None else environ).get(DIST_TIMEOUT_VAR, "")
    try:
        seconds = float(value) if value.strip() else DIST_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_VAR}={value!r}: expected a number of seconds above 0")
    return seconds


def join_process_group(env: DistEnv, dev: torch.device) -> None:
    """Join the ranks' process group. Under torchrun its agent has already gathered the ranks and holds the store:
    plain ``env://``. Otherwise rank 0 hosts a TCPStore at ``master_addr:master_port`` that every rank must reach
    within :func:`rendezvous_timeout` seconds (torch's ``env://`` would wait 30 minutes, 10 with NCCL, then print
    a traceback); collectives keep torch's default timeout."""
    cuda = dev.type == "cuda"
    backend, device_id = ("nccl", dev) if cuda else ("gloo", None)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend=backend, device_id=device_id)
        return
    timeout = rendezvous_timeout()
    log.info("rank %d of %d (%s) meeting at %s:%d", env.rank, env.world_size, env.source, env.master_addr,
             env.master_port)
    try:
        with _stderr_held():
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                                  timeout=timedelta(seconds=timeout), multi_tenant=True)
    except dist.DistError as e:
        raise RendezvousError(_rendezvous_failure(env, timeout, e)) from None
    store.set_timeout(dist.default_pg_timeout)  # from here on the store serves the process group
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            device_id=device_id)


def _rendezvous_failure(env: DistEnv, timeout: float, e: Exception) -> str:
    said = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    if env.source == "slurm":
        who = "SLURM_PROCID/SLURM_NTASKS"
        where = "MASTER_ADDR/MASTER_PORT, else SLURM_JOB_NODELIST's first host and a port from SLURM_JOB_ID"
        started = f"srun started all {env.world_size} tasks (a plain `python train.py` in a batch script is one)"
    else:
        who, where = "RANK/WORLD_SIZE", "MASTER_ADDR/MASTER_PORT"
        started = f"all {env.world_size} processes were started"
    return (f"rank {env.rank} of {env.world_size} ({who}) did not meet the others at {env.master_addr}:"
            f"{env.master_port} ({where}) within {DIST_TIMEOUT_VAR}={timeout:g} s: {said}; check that {started}, "
            f"that every node reaches that address and the port is free (MASTER_PORT moves it), or raise "
            f"{DIST_TIMEOUT_VAR}")


@contextlib.contextmanager
def _stderr_held():
    """Hold what is written to file descriptor 2 while the block runs and pass it on afterwards, unless the block
    raised torch's DistError: a rank that cannot reach its store logs each retry from C++ with a stack trace,
    which the one-line :class:`RendezvousError` replaces."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except dist.DistError:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                os.write(2, held.read())


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# CPU memory (see the module docstring)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MALLOC_THRESHOLD = 1 << 30  # blocks up to 1 GB come from (and go back to) malloc's own heap

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they are set (once is enough).
    Elsewhere than Linux with glibc it does nothing."""
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD))
    if not _kept:
        log.debug("mallopt refused the thresholds; freed memory goes back to the OS as before")
    return _kept
