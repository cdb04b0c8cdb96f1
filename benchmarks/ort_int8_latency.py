"""ONNX Runtime CPU latency: FP32 against each INT8 flavour (TensorRT-form S8S8 QDQ, CPU-form U8S8 QDQ) at batch 1 and 64.

    python benchmarks/ort_int8_latency.py EXPORT_DIR [EXPORT_DIR ...] [--threads 2] [--iterations 50]

Each EXPORT_DIR is a folder written by `dfad-edge export --int8`. Prints a Markdown table and saves
benchmarks/results/ort_int8_latency-<cpu>.json. A benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from dfad_edge.bench.latency import host_latency_ms, percentiles
from dfad_edge.env import collect_environment
from dfad_edge.export.onnx_export import ort_session, run_onnx

GRAPHS = {"fp32": "model.onnx", "int8 tensorrt-form (S8S8)": "model.int8.onnx", "int8 cpu-form (U8S8)": "model.int8.cpu.onnx"}


class Session:
    """The predict() interface host_latency_ms times, over one CPU ONNX Runtime session."""

    def __init__(self, path: Path, threads: int):
        self.session = ort_session(path, threads=threads)
        self.input_shape = self.session.get_inputs()[0].shape[1:]

    def predict(self, images):
        return run_onnx(self.session, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dirs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for folder in args.export_dirs:
        arch = json.loads((folder / "export.json").read_text())["arch"]
        for label, name in GRAPHS.items():
            session = Session(folder / name, args.threads)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                images = np.random.default_rng(0).standard_normal((batch, *session.input_shape), dtype=np.float32)
                stats = percentiles(host_latency_ms(session, images, args.iterations, args.warmup))
                rows.append({"model": arch, "graph": label, "batch": batch, **stats})
    print("| model | graph | batch | p50 ms | p90 ms | vs fp32 |\n|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"] and r["graph"] == "fp32")
        print(f"| {row['model']} | {row['graph']} | {row['batch']} | {row['p50']:.3f} | {row['p90']:.3f} | "
              f"{base['p50'] / row['p50']:.2f}x |")
    env = collect_environment()
    out = Path(__file__).parent / "results" / f"ort_int8_latency-{re.sub(r'[^A-Za-z0-9]+', '_', env['cpu'])}.json"
    out.write_text(json.dumps({"threads": args.threads, "rows": rows, "env": env}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
