"""Distillation throughput on 1 and N ranks (torchrun): the same configuration and global batch, computed by one process
and split across N, timed side by side in images/s (every synthetic image a network sees, over all ranks).

    python benchmarks/distributed_throughput.py                                   # tiny digits setup, 1 and 2 ranks, CPU
    python benchmarks/distributed_throughput.py --teacher-arch resnet56 --preset small --ranks 1,2,4,8 --device cuda

Without --teacher, a randomly initialised --teacher-arch stands in (speed does not depend on the weights). Each row runs
in fresh processes: "1 process" without torchrun (the single-process path), then each rank count under torchrun
(python -m torch.distributed.run --standalone; gloo on CPUs, NCCL on GPUs). A row warms up, then times --iterations
method iterations between barriers. On a CPU torchrun gives each of N > 1 ranks one thread, one process takes every
core: N ranks on a machine's cores cannot beat one process using them all; the figures show the cost of the
collectives. Saves benchmarks/results/distributed_throughput-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill_throughput import stand_in_teacher
from dfad_edge.distill import DistillRun, apply_overrides, preset_config
from dfad_edge.distributed import is_distributed, is_main, torchrun_process_group, world_size
from dfad_edge.env import collect_environment


def measure(args: argparse.Namespace) -> None:
    """One row, in this process (and its torchrun siblings): images/s of every rank together, written by rank 0."""
    with torchrun_process_group(args.device), tempfile.TemporaryDirectory() as scratch:
        config = replace(apply_overrides(preset_config(args.method, args.preset), args.set), device=args.device)
        run = DistillRun(config, args.teacher, Path(scratch) / "run")
        for _ in range(args.warmup):  # allocator, kernels, and for the pool method a pool to draw student batches from
            run.method.iteration(0.5)
        synchronize()
        started = time.perf_counter()
        images = sum(run.method.iteration(0.5)["images"] for _ in range(args.iterations)) * world_size()
        synchronize()
        seconds = time.perf_counter() - started
        if is_main():
            Path(args.worker).write_text(json.dumps({
                "ranks": world_size(), "torchrun": is_distributed(), "threads_per_rank": torch.get_num_threads(),
                "seconds": round(seconds, 3), "images": images, "images_per_s": round(images / seconds, 1)}))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if is_distributed():
        torch.distributed.barrier()


def row(args: argparse.Namespace, ranks: int | None, teacher: Path, folder: Path) -> dict:
    """One row in fresh processes: ranks=None is one process without torchrun."""
    result = folder / f"row-{ranks}.json"
    launcher = [sys.executable] if ranks is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc-per-node", str(ranks)]
    options = ["--teacher", str(teacher), "--method", args.method, "--preset", args.preset, "--device", args.device,
               "--warmup", str(args.warmup), "--iterations", str(args.iterations), "--worker", str(result)]
    options += [item for assignment in args.set for item in ("--set", assignment)]
    subprocess.run(launcher + [__file__, *options], check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--teacher-arch", default="digits_cnn")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--method", default="pool", choices=("pool", "dfad"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="a distill option, key=value (repeatable)")
    parser.add_argument("--ranks", default="1,2", help="rank counts to time under torchrun")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measure(args)
        return

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        teacher = args.teacher or stand_in_teacher(args.teacher_arch, args.num_classes, folder)
        rows = [row(args, None, teacher, folder)] + [row(args, int(n), teacher, folder) for n in args.ranks.split(",")]
    env = collect_environment()
    machine = env["gpu"]["name"] if env["gpu"] else env["cpu"]
    config = apply_overrides(preset_config(args.method, args.preset), args.set)
    print(f"{args.method} preset {args.preset} ({', '.join(args.set) or 'as preset'}), global batch "
          f"{config.options.batch_size}, {args.iterations} iterations, {machine} ({args.device}, {env['cpu_cores']} cores)")
    print(f"{'row':24s} {'threads/rank':>12s} {'images/s':>10s} {'vs 1 process':>13s}")
    for entry in rows:
        name = "1 process" if not entry["torchrun"] else f"torchrun, {entry['ranks']} rank(s)"
        print(f"{name:24s} {entry['threads_per_rank']:12d} {entry['images_per_s']:10.1f} "
              f"{entry['images_per_s'] / rows[0]['images_per_s']:12.2f}x")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", machine).strip("_")
    out = Path(__file__).parent / "results" / f"distributed_throughput-{slug}.json"
    out.write_text(json.dumps({"method": args.method, "preset": args.preset, "set": args.set,
                               "teacher": str(args.teacher or args.teacher_arch), "device": args.device,
                               "global_batch_size": config.options.batch_size, "iterations": args.iterations,
                               "warmup": args.warmup, "rows": rows, "env": env}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
