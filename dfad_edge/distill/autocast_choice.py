"""``--amp auto`` decided by measurement: the same CPU flags (AVX512-BF16) make bf16 2.7x faster on a Zen 4 and slower
than fp32 on a Xeon without AMX, so instruction sets alone cannot choose. At start-up, a few training steps of this
run's teacher and student (teacher forward, student forward and backward, at the run's batch) are timed in fp32 and
in each mixed-precision type the hardware offers, interleaved, and the fastest is used. The result is cached per
machine, PyTorch version, models and shapes, so a second run on the same machine starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..io import atomic_write_json
from ..runtime import autocast, autocast_dtype

WARMUP_STEPS = 2
ROUNDS = 3
STEPS_PER_ROUND = 2
NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
AMP_SETTING = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_candidates(device: torch.device) -> list[torch.dtype | None]:
    """fp32 and the mixed-precision type runtime.autocast_dtype picks from the hardware, if it picks one."""
    return list(dict.fromkeys([None, autocast_dtype(device, "auto")]))


def cache_file() -> Path:
    root = os.environ.get("DFAD_EDGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "dfad-edge")
    return Path(root) / "autocast.json"


def machine_key(device: torch.device, what: dict) -> str:
    """The processor (model name and flags) or GPU, PyTorch, and what the caller says the workload is."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                lines = [line for line in handle if line.startswith(("model name", "flags"))][:2]
            hardware = "".join(lines)
        except OSError:
            pass
    text = json.dumps({"hardware": hardware, "threads": torch.get_num_threads(), "torch": torch.__version__, **what},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _timed_steps(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor], dtype,
                 steps: int) -> float:
    """Seconds per step: the teacher's forward without gradients, the student's forward and backward (``images``: a
    batch at each one's input size)."""
    teacher_images, student_images = images
    device = student_images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        with autocast(device, dtype):
            with torch.no_grad():
                teacher(teacher_images)
            loss = student(student_images).float().square().mean()
        loss.backward()
        student.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def measure(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
            candidates: list) -> dict[str, float]:
    """Milliseconds per step of each candidate, the median of interleaved rounds (so drift favours none)."""
    for dtype in candidates:
        _timed_steps(teacher, student, images, dtype, WARMUP_STEPS)
    rounds: dict = {dtype: [] for dtype in candidates}
    for _ in range(ROUNDS):
        for dtype in candidates:
            rounds[dtype].append(_timed_steps(teacher, student, images, dtype, STEPS_PER_ROUND))
    return {NAMES[dtype]: round(1000 * statistics.median(times), 2) for dtype, times in rounds.items()}


def choose_autocast(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
                    workload: dict) -> tuple[str, dict]:
    """The ``amp`` setting to run with ("off", "bf16" or "fp16") and how it was decided, for config.json."""
    device = images[1].device
    candidates = autocast_candidates(device)
    if len(candidates) == 1:
        return "off", {"chosen": "fp32", "why": "no mixed-precision type runs natively here"}
    key = machine_key(device, workload)
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]["amp"], {**cached[key]["record"], "cached": str(path)}
    ms_per_step = measure(teacher, student, images, candidates)
    fastest = min(candidates, key=lambda dtype: ms_per_step[NAMES[dtype]])
    record = {"chosen": NAMES[fastest], "ms_per_step": ms_per_step, "batch": len(images[1]),
              "why": "fastest of fp32 and the native mixed-precision type, measured at start-up"}
    try:
        atomic_write_json(path, {**cached, key: {"amp": AMP_SETTING[fastest], "record": record}})
    except OSError:
        pass  # a read-only home: measured again next time
    return AMP_SETTING[fastest], record
