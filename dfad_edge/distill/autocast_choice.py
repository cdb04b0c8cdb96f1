"""``--amp auto`` decided by measurement: the same CPU flags (AVX512-BF16) make bf16 2.7x faster on a Zen 4 and slower
than fp32 on a Xeon without AMX, so instruction sets alone cannot choose, and one model can gain where another loses
(on a Xeon with AMX, a ResNet-18 teacher's forward at 224 px is 2.4x faster in bf16, a MobileNetV3 student's training
step slower). At start-up the teacher's forward (no gradients) and the student's training step (forward and
backward) are each timed at the run's batch in fp32 and in the mixed-precision type the hardware offers, interleaved,
and each network takes its faster. The teacher is timed as built, not as the folded copy with pre-cast weights the run
uses: casting ResNet-18's weights per call is small against its forward at a batch of 64. The result is cached per
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
from ..env import cpuinfo_field
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
        model = cpuinfo_field("model name") or platform.processor() or platform.machine()
        hardware = f"{model} {cpuinfo_field('flags')}"
    text = json.dumps({"hardware": hardware, "threads": torch.get_num_threads(), "torch": torch.__version__, **what},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _timed(step, steps: int, device: torch.device) -> float:
    """Seconds per call of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def _steps(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor], dtype) -> dict:
    """The two timed workloads in ``dtype``: the teacher's forward without gradients, the student's forward and backward
    (``images``: a batch at each one's input size)."""
    teacher_images, student_images = images
    device = student_images.device

    def teacher_forward():
        with torch.no_grad(), autocast(device, dtype):
            teacher(teacher_images)

    def student_step():
        with autocast(device, dtype):
            loss = student(student_images).float().square().mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    return {"teacher": teacher_forward, "student": student_step}


def measure(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
            candidates: list) -> dict[str, dict[str, float]]:
    """Milliseconds per call of the teacher's forward and of the student's step in each candidate type, the median of
    interleaved rounds (so drift favours none)."""
    device = images[1].device
    workloads = {dtype: _steps(teacher, student, images, dtype) for dtype in candidates}
    for steps in workloads.values():
        for step in steps.values():
            _timed(step, WARMUP_STEPS, device)
    rounds: dict = {(part, dtype): [] for dtype in candidates for part in ("teacher", "student")}
    for _ in range(ROUNDS):
        for dtype, steps in workloads.items():
            for part, step in steps.items():
                rounds[part, dtype].append(_timed(step, STEPS_PER_ROUND, device))
    return {part: {NAMES[dtype]: round(1000 * statistics.median(rounds[part, dtype]), 2) for dtype in candidates}
            for part in ("teacher", "student")}


def choose_autocast(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
                    workload: dict) -> tuple[str, str, dict]:
    """The ``amp`` setting for the student's training (and the generator's), the ``teacher_amp`` setting for the
    teacher's forwards without gradients ("off", "bf16" or "fp16" each), and how they were decided, for config.json."""
    device = images[1].device
    candidates = autocast_candidates(device)
    if len(candidates) == 1:
        return "off", "off", {"chosen": "fp32", "teacher": "fp32", "why": "no mixed-precision type runs natively here"}
    key = machine_key(device, {**workload, "timed": "teacher and student apart"})
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        entry = cached[key]
        return entry["amp"], entry["teacher_amp"], {**entry["record"], "cached": str(path)}
    ms = measure(teacher, student, images, candidates)
    student_type, teacher_type = (min(candidates, key=lambda dtype: ms[part][NAMES[dtype]])
                                  for part in ("student", "teacher"))
    record = {"chosen": NAMES[student_type], "teacher": NAMES[teacher_type], "ms_per_step": ms, "batch": len(images[1]),
              "why": "for the student's step and the teacher's forward apart, the faster of fp32 and the native "
                     "mixed-precision type, measured at start-up"}
    entry = {"amp": AMP_SETTING[student_type], "teacher_amp": AMP_SETTING[teacher_type], "record": record}
    try:
        atomic_write_json(path, {**cached, key: entry})
    except OSError:
        pass  # a read-only home: measured again next time
    return entry["amp"], entry["teacher_amp"], record
