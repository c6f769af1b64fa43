"""Where a process runs and how: device, precision, ranks, seeds and RNG state, compile, CPU memory.

* Device: ``auto`` is CUDA when available, else CPU (:func:`resolve_device`, shared by training and evaluation).
* Precision (``trainer.precision=auto``): on CUDA bf16 autocast when the GPU supports it, else fp16 autocast with
  a GradScaler; on CPU bf16 autocast when oneDNN reports native bf16 (AVX512-BF16 or AMX), else fp32. Weights,
  optimizer state, the loss and RoPE's angles stay fp32.
* Ranks: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the process group is NCCL on CUDA, gloo on CPU.
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
from dataclasses import dataclass
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


def resolve_device(want: Device | str, key: str = "trainer.device", index: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error naming ``key``."""
    want = Device(want)
    if want == Device.cuda and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or auto")
    if want == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def setup_runtime(device: Device, precision: Precision, threads: int = 0) -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device, join the process group (NCCL on CUDA, gloo
    on CPU), set the thread count and resolve the precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, index=local_rank if world_size > 1 else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    if threads:
        torch.set_num_threads(threads)
    dtype, scaler = resolve_precision(precision, dev)
    return Runtime(dev, rank, local_rank, world_size, dtype, scaler)


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
