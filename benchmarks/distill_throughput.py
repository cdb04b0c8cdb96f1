"""DFAD training throughput: iterations/s and images/s of one teacher/student pair on one device.

    python benchmarks/distill_throughput.py --teacher teacher.pt --student resnet20 --batch-size 64 --device cpu
    python benchmarks/distill_throughput.py --teacher-arch resnet34_8x --student resnet18_8x --device cuda --amp auto

Without --teacher, a randomly initialised --teacher-arch stands in (speed does not depend on the weights).
Prints a table and saves benchmarks/results/distill_throughput-<device>-<pair>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dfad_edge.checkpoint import InputSpec, model_checkpoint
from dfad_edge.distill import DistillRun, preset_config
from dfad_edge.env import collect_environment
from dfad_edge.models import create_model, default_input_size


def stand_in_teacher(arch: str, num_classes: int, folder: Path) -> Path:
    height, width = default_input_size(arch)
    model = create_model(arch, num_classes=num_classes, in_channels=3)
    spec = InputSpec(3, height, width, [0.5] * 3, [0.25] * 3)
    path = folder / "teacher.pt"
    model_checkpoint(model, arch, {"num_classes": num_classes, "in_channels": 3}, num_classes, spec, None,
                     "benchmark").save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--teacher-arch", default="resnet56")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--bn-stats", type=float, default=1.0, help="0 = plain DFAD")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        teacher = args.teacher or stand_in_teacher(args.teacher_arch, args.num_classes, Path(scratch))
        config = preset_config("cifar10", student_arch=args.student, batch_size=args.batch_size, device=args.device,
                               amp=args.amp, bn_stats=args.bn_stats, class_balance=1.0 if args.bn_stats else 0.0,
                               compile=args.compile or None, channels_last=not args.no_channels_last)
        run = DistillRun(config, teacher, Path(scratch) / "run")
        for _ in range(args.warmup):
            run.iteration()
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.iterations):
            run.iteration()
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds_per_iteration = (time.perf_counter() - started) / args.iterations
    images = (config.student_steps + 1) * config.batch_size
    result = {"teacher": str(args.teacher or args.teacher_arch), "student": args.student, "batch_size": args.batch_size,
              "device": str(run.device), "amp": str(run.amp_dtype), "channels_last": run.channels_last,
              "bn_stats": args.bn_stats, "seconds_per_iteration": round(seconds_per_iteration, 3),
              "iterations_per_s": round(1 / seconds_per_iteration, 3),
              "images_per_s": round(images / seconds_per_iteration, 1), "env": collect_environment()}
    print(f"{result['teacher']} -> {args.student}, batch {args.batch_size}, {result['device']}, amp {result['amp']}: "
          f"{result['seconds_per_iteration']} s/iteration, {result['images_per_s']} images/s")
    out = Path(__file__).parent / "results" / f"distill_throughput-{run.device.type}-{Path(result['teacher']).stem}-{args.student}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
