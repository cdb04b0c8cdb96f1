"""The environment facts a user needs to report a problem or compare two benchmark reports honestly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key starts with one of ``names`` (case-insensitive: ARM boards
    write "Hardware"); None where there is none or the file cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.lower().startswith(names)), None)
    except OSError:
        return None


def _cpu_model() -> str:
    return cpuinfo_field("model name", "hardware") or platform.processor() or platform.machine()


def _jetson_facts() -> dict | None:
    model_file = Path("/proc/device-tree/model")
    if not model_file.exists() or "jetson" not in model_file.read_text(errors="ignore").lower():
        return None
    facts = {"model": model_file.read_text(errors="ignore").strip("\x00 \n")}
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
        facts["power_mode"] = " ".join(out.split()) or "unknown"
    except (OSError, subprocess.SubprocessError):
        facts["power_mode"] = "unknown (nvpmodel not found)"
    return facts


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


def collect_environment() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu,
        "nvidia_driver": _nvidia_driver(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "tensorrt": tensorrt_version() or "not installed",
        "numpy": numpy.__version__,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jetson": _jetson_facts(),
        **_training_precision(),
    }


def _training_precision() -> dict:
    """What ``--amp auto`` detects and picks on this machine's default device."""
    from .runtime import autocast_dtype, cpu_bf16_instructions, resolve_device

    dtype = autocast_dtype(resolve_device("auto"))
    return {"cpu_bf16_instructions": cpu_bf16_instructions(),
            "amp_auto": str(dtype).replace("torch.", "") if dtype is not None else "fp32 (no native bf16)"}
