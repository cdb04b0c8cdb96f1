"""``--amp auto`` and ``channels_last=auto`` decided by measurement: the same CPU flags (AVX512-BF16) make bf16 2.7x
faster on a Zen 4 and slower than fp32 on a Xeon without AMX, so instruction sets alone cannot choose, and one model
can gain where another loses (on a Xeon with AMX, a ResNet-18 teacher's forward at 224 px is 2.4x faster in bf16, a
MobileNetV3 student's training step slower). NHWC (channels_last) is oneDNN's and the tensor cores' preferred layout,
but depthwise convolutions and small images need not gain from it. At start-up the teacher's forward (no gradients)
and the student's training step (forward and backward) are each timed at the run's batch in every candidate: fp32 and
the mixed-precision type the hardware offers, each in NCHW and NHWC (where those are ``auto``), interleaved. Each
network takes its faster type; the memory format, which the run's images and both networks share, is the one whose
two best times sum lowest. The teacher is timed as built, not as the folded copy with pre-cast weights the run uses:
casting ResNet-18's weights per call is small against its forward at a batch of 64. The result is cached per machine,
PyTorch version, models and shapes, so a second run on the same machine starts at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..env import cpuinfo_field
from ..io import atomic_write_json
from ..runtime import autocast, autocast_dtype

WARMUP_STEPS = 2
ROUNDS = 3
STEPS_PER_ROUND = 2
NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
AMP_SETTING = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
FORMATS = {False: "NCHW", True: "NHWC"}


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


def label(candidate: tuple) -> str:
    """A candidate (autocast type or None, channels_last) as recorded: e.g. "bf16 NHWC"."""
    dtype, channels_last = candidate
    return f"{NAMES[dtype]} {FORMATS[channels_last]}"


def _in_memory_format(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
                      channels_last: bool) -> tuple:
    """The networks and images as the run would hold them in this format (NHWC ones copied: both formats are timed)."""
    if not channels_last:
        return teacher, student, images
    teacher, student = (copy.deepcopy(model).to(memory_format=torch.channels_last) for model in (teacher, student))
    return teacher, student, tuple(batch.contiguous(memory_format=torch.channels_last) for batch in images)


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
            candidates: list[tuple]) -> dict[str, dict[str, float]]:
    """Milliseconds per call of the teacher's forward and of the student's step for each candidate (autocast type,
    channels_last), keyed by its label; the median of interleaved rounds (so drift favours none). ``images`` are in
    NCHW, the networks as built."""
    device = images[1].device
    formats = {channels_last: _in_memory_format(teacher, student, images, channels_last)
               for channels_last in dict.fromkeys(channels_last for _dtype, channels_last in candidates)}
    workloads = {candidate: _steps(*formats[candidate[1]], candidate[0]) for candidate in candidates}
    for steps in workloads.values():
        for step in steps.values():
            _timed(step, WARMUP_STEPS, device)
    rounds: dict = {(part, candidate): [] for candidate in candidates for part in ("teacher", "student")}
    for _ in range(ROUNDS):
        for candidate, steps in workloads.items():
            for part, step in steps.items():
                rounds[part, candidate].append(_timed(step, STEPS_PER_ROUND, device))
    return {part: {label(candidate): round(1000 * statistics.median(rounds[part, candidate]), 2)
                   for candidate in candidates} for part in ("teacher", "student")}


def fastest(ms: dict[str, dict[str, float]], formats: list[bool], student_types: list,
            teacher_types: list) -> tuple[tuple, tuple]:
    """The student's and the teacher's candidate (type, channels_last): each network its faster of its own types, both
    in the one memory format whose two best times sum lowest (one teacher forward per student step, as in every
    method's student step; a generator's step, which also runs in that format, is not timed)."""
    def best(part: str, types: list, channels_last: bool) -> tuple:
        return min(((dtype, channels_last) for dtype in types), key=lambda candidate: ms[part][label(candidate)])

    def total(channels_last: bool) -> float:
        return (ms["student"][label(best("student", student_types, channels_last))]
                + ms["teacher"][label(best("teacher", teacher_types, channels_last))])

    channels_last = min(formats, key=total)
    return best("student", student_types, channels_last), best("teacher", teacher_types, channels_last)


def choose_speed_settings(teacher: nn.Module, student: nn.Module, images: tuple[torch.Tensor, torch.Tensor],
                          workload: dict, amp: str, teacher_amp: str, channels_last: str) -> tuple[str, str, str, dict]:
    """``amp`` and ``channels_last`` made concrete where they are "auto": the ``amp`` setting for the student's training
    (and the generator's), the ``teacher_amp`` setting for the teacher's forwards without gradients ("off", "bf16" or
    "fp16" each; a ``teacher_amp`` other than "same" is the only type the teacher is judged in), ``channels_last``
    ("on" or "off"), and how they were decided, for config.json. ``images``: NCHW."""
    device = images[1].device
    student_types = autocast_candidates(device) if amp == "auto" else [autocast_dtype(device, amp)]
    teacher_types = student_types if teacher_amp == "same" else [autocast_dtype(device, teacher_amp)]
    formats = [False, True] if channels_last == "auto" else [channels_last == "on"]
    if len(student_types) == len(teacher_types) == len(formats) == 1:
        (student_type,), (teacher_type,), (fmt,) = student_types, teacher_types, formats
        return AMP_SETTING[student_type], AMP_SETTING[teacher_type], "on" if fmt else "off", {
            "chosen": NAMES[student_type], "teacher": NAMES[teacher_type], "channels_last": fmt,
            "why": "nothing to time: no mixed-precision type runs natively here"}
    candidates = [(dtype, fmt) for fmt in formats for dtype in dict.fromkeys(student_types + teacher_types)]
    key = machine_key(device, {**workload, "student_candidates": [NAMES[dtype] for dtype in student_types],
                               "teacher_candidates": [NAMES[dtype] for dtype in teacher_types],
                               "formats": [FORMATS[fmt] for fmt in formats], "timed": "teacher and student apart"})
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        entry = cached[key]
        return entry["amp"], entry["teacher_amp"], entry["channels_last"], {**entry["record"], "cached": str(path)}
    ms = measure(teacher, student, images, candidates)
    student_choice, teacher_choice = fastest(ms, formats, student_types, teacher_types)
    record = {"chosen": NAMES[student_choice[0]], "teacher": NAMES[teacher_choice[0]],
              "channels_last": student_choice[1], "ms_per_step": ms, "batch": len(images[1]),
              "why": "each network the faster of its timed types, both in the memory format whose best times sum "
                     "lowest, measured at start-up"}
    entry = {"amp": AMP_SETTING[student_choice[0]], "teacher_amp": AMP_SETTING[teacher_choice[0]],
             "channels_last": "on" if student_choice[1] else "off", "record": record}
    try:
        atomic_write_json(path, {**cached, key: entry})
    except OSError:
        pass  # a read-only home: measured again next time
    return entry["amp"], entry["teacher_amp"], entry["channels_last"], record
