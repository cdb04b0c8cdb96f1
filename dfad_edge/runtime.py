"""Device selection, mixed precision and seeding: CUDA first, the same code on a CPU."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .env import cpuinfo_field
from .errors import DfadError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DfadError("--device cuda was asked for but no CUDA GPU is visible to PyTorch (see dfad-edge doctor)")
    if not (name == "cpu" or name.startswith("cuda")):
        raise DfadError(f"unknown device '{name}': use auto, cpu or cuda[:N]")
    return torch.device(name)


def has_native_bf16(device: torch.device) -> bool:
    """bf16 at full speed: tensor cores of compute capability 8.0+ (Ampere, Hopper, Orin). Older GPUs (T4, V100, Xavier)
    report bf16 as supported but emulate it, slowly; torch.cuda.is_bf16_supported() says yes there too."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_bf16_instructions() -> list[str]:
    """The CPU's native bf16 instruction sets (AVX512-BF16 on Zen 4 / Cooper Lake and later, AMX-BF16 on Sapphire
    Rapids and later), read from /proc/cpuinfo; empty where there are none or the flags cannot be read."""
    flags = (cpuinfo_field("flags") or "").split()
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]


def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The mixed-precision type to train in: bf16 where the hardware runs it natively (GPUs of compute capability 8.0+,
    CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler (see grad_scaler) on older GPUs, fp32 on other CPUs,
    where bf16 would be emulated and slower."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_instructions() else None
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none (the scaler is then a
    pass-through whose state is still saved, so a resumed run is the same run)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device: torch.device, dtype: torch.dtype | None, override: bool = False):
    """Autocast to ``dtype`` (None: fp32). ``override``: this region's choice holds inside another autocast region too
    (the teacher's forwards in fp32 within a student step in bf16)."""
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False) if override else contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held so far: on CUDA the tensors PyTorch allocated on the GPU, on a CPU the
    process's peak resident set (what an out-of-memory killer counts)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """The random streams a run draws from; on CUDA, the generator of its own GPU only (a run resumed where other GPUs
    are visible, or fewer, must still restore it)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return _to_plain(state)


def restore_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_python_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_plain(state: dict) -> dict:
    """RNG states as tensors, lists and numbers only, so they survive weights_only loading."""
    version, internal, gauss = state["python"]
    numpy_state = state["numpy"]
    plain = dict(state)
    plain["python"] = [version, list(internal), gauss]
    plain["numpy"] = [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]
    return plain


def _python_state(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(int(v) for v in internal), gauss)


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """PyTorch's CPU thread count for a block (None = leave it), restored afterwards. The ONNX Runtime backends take
    the same count, so one setting governs both runtimes."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
