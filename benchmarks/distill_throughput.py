"""Distillation throughput: dfad-edge's loop against a plain eager fp32 loop of the published DFAD recipe, same
teacher, student, batch and device, timed side by side in interleaved rounds (so machine drift hits both alike).

    python benchmarks/distill_throughput.py --teacher teacher.pt --student resnet20 --batch-size 128
    python benchmarks/distill_throughput.py --teacher-arch resnet56 --student resnet20 --device cuda

Without --teacher, a randomly initialised --teacher-arch stands in (speed does not depend on the weights).
Reports images/s for each loop (every synthetic image a network sees: 5 student batches + 1 generator batch per
DFAD iteration), the ratio to the plain loop, a per-phase breakdown (generator step, teacher forward, student step),
and the pool method's synthesis (with its sampled batches) and student steps measured separately. Saves
benchmarks/results/distill_throughput-<machine>.json with the CPU's model and instruction-set flags, or the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dfad_edge.checkpoint import InputSpec, model_checkpoint
from dfad_edge.distill import DistillRun, apply_overrides, preset_config
from dfad_edge.env import collect_environment, cpuinfo_field
from dfad_edge.models import create_model, default_input_size
from dfad_edge.models.generator import UpsampleConv2d
from dfad_edge.runtime import cpu_bf16_instructions

STUDENT_STEPS = 5  # the published recipe: 5 student steps per generator step


def stand_in_teacher(arch: str, num_classes: int, folder: Path) -> Path:
    height, width = default_input_size(arch)
    model = create_model(arch, num_classes=num_classes, in_channels=3)
    spec = InputSpec(3, height, width, [0.5] * 3, [0.25] * 3)
    path = folder / "teacher.pt"
    model_checkpoint(model, arch, {"num_classes": num_classes, "in_channels": 3}, num_classes, spec, None,
                     "benchmark").save(path)
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainDfadLoop:
    """The published recipe written plainly: eager fp32, NCHW, no remedies, the way a paper's code runs it."""

    def __init__(self, teacher: torch.nn.Module, student_arch: str, num_classes: int, batch_size: int,
                 device: torch.device):
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = create_model(student_arch, num_classes=num_classes, in_channels=3).to(device).train()
        self.generator = create_model("generator_a", nz=256, ngf=64, img_size=32, channels=3).to(device).train()
        for layer in self.generator.modules():
            if isinstance(layer, UpsampleConv2d):
                layer.subpixel = False  # as the paper's code computes it: upsample, then convolve
        self.optimizer_s = torch.optim.SGD(self.student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        self.batch_size, self.device = batch_size, device

    def student_step(self) -> None:
        with torch.no_grad():
            images = self.generator(torch.randn(self.batch_size, 256, device=self.device))
            teacher_logits = self.teacher(images)
        loss = F.l1_loss(self.student(images), teacher_logits)
        self.optimizer_s.zero_grad()
        loss.backward()
        self.optimizer_s.step()

    def generator_step(self) -> None:
        images = self.generator(torch.randn(self.batch_size, 256, device=self.device))
        loss = -F.l1_loss(self.student(images), self.teacher(images))
        self.optimizer_g.zero_grad()
        loss.backward()
        self.optimizer_g.step()

    def teacher_forward(self) -> None:
        with torch.no_grad():
            self.teacher(torch.randn(self.batch_size, 3, 32, 32, device=self.device))

    def iteration(self) -> None:
        for _ in range(STUDENT_STEPS):
            self.student_step()
        self.generator_step()


def timed(run, device: torch.device, repeats: int) -> float:
    """Seconds per call, the median of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def project_run(teacher: Path, student: str, batch_size: int, device: str, method: str, changes: list[str],
                folder: Path) -> DistillRun:
    """dfad-edge's own loop with its defaults (amp and channels_last auto), on the same recipe and batch."""
    config = preset_config(method, "cifar100" if method == "dfad" else "small")
    config = replace(apply_overrides(config, [f"batch_size={batch_size}", *changes]), student_arch=student,
                     device=device)
    return DistillRun(config, teacher, folder)


def project_phases(run: DistillRun) -> dict:
    method, setup = run.method, run.setup
    images = torch.randn(method.options.batch_size, *setup.student_spec.shape, device=setup.device)

    def teacher_forward():
        with torch.no_grad(), setup.autocast():
            setup.teacher_logits(setup.to_memory_format(images))

    return {"generator step": method.adversary.step, "teacher forward": teacher_forward,
            "student step": method.student_step}


def cpu_flags() -> list[str]:
    flags = (cpuinfo_field("flags") or "").split()
    return sorted(flag for flag in flags if re.match(r"(avx|amx|fma|sse4|vnni)", flag))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--teacher-arch", default="resnet56")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3, help="DFAD iterations timed per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the project loop with --compile")
    parser.add_argument("--out", type=Path, help="where to save the JSON (default: benchmarks/results/"
                        "distill_throughput-<machine>.json)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        teacher_path = args.teacher or stand_in_teacher(args.teacher_arch, args.num_classes, folder)
        runs = {"dfad-edge default": project_run(teacher_path, args.student, args.batch_size, args.device, "dfad", [],
                                                 folder / "default"),
                "dfad-edge fp32": project_run(teacher_path, args.student, args.batch_size, args.device, "dfad",
                                              ["amp=off"], folder / "fp32")}
        if args.compile:
            runs["dfad-edge compiled"] = project_run(teacher_path, args.student, args.batch_size, args.device, "dfad",
                                                     ["compile=true"], folder / "compiled")
        device = runs["dfad-edge default"].device
        plain = PlainDfadLoop(runs["dfad-edge default"].teacher_checkpoint.build_model(), args.student,
                              args.num_classes, args.batch_size, device)
        loops = {"plain eager fp32 (published recipe)": plain.iteration,
                 **{name: (lambda run=run: run.method.iteration(0.0)) for name, run in runs.items()}}
        for loop in loops.values():  # warm-up: allocator, kernels, compilation
            loop()
        per_iteration: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                per_iteration[name].append(timed(loop, device, args.iterations))
        images = (STUDENT_STEPS + 1) * args.batch_size
        results = {name: {"seconds_per_iteration": round(statistics.median(times), 4),
                          "images_per_s": round(images / statistics.median(times), 1),
                          "images_per_s_rounds": [round(images / t, 1) for t in times]}
                   for name, times in per_iteration.items()}
        for name, run in runs.items():  # what each project loop ran as, once auto was decided
            results[name]["settings"] = {key: getattr(run.config, key) for key in ("amp", "teacher_amp", "channels_last")}
        baseline = results["plain eager fp32 (published recipe)"]["images_per_s"]
        for entry in results.values():
            entry["ratio_to_plain"] = round(entry["images_per_s"] / baseline, 2)
        phases = {"plain eager fp32 (published recipe)": {
            "generator step": timed(plain.generator_step, device, 3), "teacher forward": timed(plain.teacher_forward, device, 3),
            "student step": timed(plain.student_step, device, 3)}}
        for name, run in runs.items():
            phases[name] = {phase: timed(fn, device, 3) for phase, fn in project_phases(run).items()}
        pool = project_run(teacher_path, args.student, args.batch_size, args.device, "pool", ["warmup=0"], folder / "pool")
        pool.method.synthesize_batch(0.5)
        phases["pool method (preset small), its own phases"] = {
            "synthesis (one batch, its generator steps and sampled batches)": timed(lambda: pool.method.synthesize_batch(0.5), device, 3),
            "student step (pool, cached logits)": timed(pool.method.student_step, device, 3)}
        phases = {loop: {phase: round(seconds * 1000, 1) for phase, seconds in entry.items()} for loop, entry in phases.items()}

    env = collect_environment()
    machine = env["gpu"]["name"] if env["gpu"] else env["cpu"]
    result = {"teacher": str(args.teacher or args.teacher_arch), "student": args.student, "batch_size": args.batch_size,
              "device": str(device), "amp_default": str(runs["dfad-edge default"].amp_dtype),
              "amp_choice": runs["dfad-edge default"].amp_choice, "rounds": args.rounds,
              "iterations_per_round": args.iterations, "loops": results, "phases_ms_per_call": phases,
              "cpu_bf16_instructions": cpu_bf16_instructions(), "cpu_flags": cpu_flags(), "env": env}
    print(f"{result['teacher']} -> {args.student}, batch {args.batch_size}, {machine} ({result['device']}); "
          f"native bf16: {result['cpu_bf16_instructions'] or 'none'}")
    print(f"{'loop':40s} {'images/s':>10s} {'ratio':>6s}  per round")
    for name, entry in results.items():
        print(f"{name:40s} {entry['images_per_s']:10.1f} {entry['ratio_to_plain']:5.2f}x  {entry['images_per_s_rounds']}")
    print("phases, ms per call:")
    for loop, entry in phases.items():
        print(f"  {loop}: " + ", ".join(f"{phase} {ms}" for phase, ms in entry.items()))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", machine).strip("_")
    out = args.out or Path(__file__).parent / "results" / f"distill_throughput-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
