"""Is this machine quiet enough to benchmark? Times one fixed ONNX Runtime workload, alone in its process, in
back-to-back windows and prints each window's median. The spread of those medians is the machine's own drift: no
bench run on it can repeat more tightly than that.

    python benchmarks/machine_drift.py EXPORT_DIR [--minutes 2] [--window-s 10] [--batch 64] [--threads 2]

EXPORT_DIR is a folder written by `dfad-edge export` (its model.onnx is timed). Saves
benchmarks/results/machine_drift-<cpu>.json. A benchmark, not a test: figures depend on the machine and the hour.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from dfad_edge.bench.latency import gc_paused
from dfad_edge.env import collect_environment
from dfad_edge.export.onnx_export import ort_session, run_onnx


def window_medians(run, minutes: float, window_s: float) -> list[float]:
    medians, deadline = [], time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        times, window_end = [], time.monotonic() + window_s
        with gc_paused():
            while time.monotonic() < window_end:
                started = time.perf_counter()
                run()
                times.append((time.perf_counter() - started) * 1000.0)
        medians.append(float(np.median(times)))
        print(f"window {len(medians):3d}: median {medians[-1]:9.3f} ms over {len(times)} calls", flush=True)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    session = ort_session(args.export_dir / "model.onnx", threads=args.threads)
    shape = session.get_inputs()[0].shape[1:]
    images = np.random.default_rng(0).standard_normal((args.batch, *shape), dtype=np.float32)
    for _ in range(5):
        run_onnx(session, images)
    medians = window_medians(lambda: run_onnx(session, images), args.minutes, args.window_s)
    middle = float(np.median(medians))
    drift = max(max(medians) - middle, middle - min(medians)) / middle
    env = collect_environment()
    print(f"window medians {min(medians):.3f}-{max(medians):.3f} ms around {middle:.3f}: drift up to {drift:.1%}")
    out = Path(__file__).parent / "results" / f"machine_drift-{re.sub(r'[^A-Za-z0-9]+', '_', env['cpu'])[:40]}.json"
    out.write_text(json.dumps({"model": str(args.export_dir / "model.onnx"), "batch": args.batch, "threads": args.threads,
                               "window_s": args.window_s, "window_medians_ms": [round(m, 4) for m in medians],
                               "drift": round(drift, 4), "cpu": env["cpu"]}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
