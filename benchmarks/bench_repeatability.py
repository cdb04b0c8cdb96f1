"""Are bench latency medians stable? Runs the same `dfad-edge bench` twice and checks that every row's p50 from the
second run lies within the p10-p90 spread the first run reported (and vice versa).

    python benchmarks/bench_repeatability.py --teacher T_EXPORT --student S_EXPORT --data SRC [--device cpu]

Saves benchmarks/results/bench_repeatability.json and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dfad_edge.bench import BenchOptions, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    options = BenchOptions(backends=["torch", "onnxruntime"], precisions=["fp32", "int8"], device=args.device,
                           batch_sizes=[int(b) for b in args.batch_sizes.split(",")], iterations=args.iterations)
    with tempfile.TemporaryDirectory() as scratch:
        runs = [run_bench(args.teacher, args.student, args.data, Path(scratch) / f"run{i}", options) for i in (1, 2)]
    lines, all_within = [], True
    for first in (r for r in runs[0]["results"] if "skipped" not in r):
        second = next(r for r in runs[1]["results"]
                      if (r["model"], r["backend"], r["precision"]) == (first["model"], first["backend"], first["precision"]))
        for batch, a in first["latency_ms"].items():
            b = second["latency_ms"][batch]
            within = a["p10"] <= b["p50"] <= a["p90"] and b["p10"] <= a["p50"] <= b["p90"]
            all_within &= within
            lines.append({"row": f"{first['model']} {first['backend']} {first['precision']} b{batch}",
                          "p50_run1": a["p50"], "p50_run2": b["p50"], "spread_run1": [a["p10"], a["p90"]],
                          "within_spread": within})
    for line in lines:
        print(f"{line['row']:40s} p50 {line['p50_run1']:9.3f} / {line['p50_run2']:9.3f} ms  "
              f"spread1 {line['spread_run1'][0]:.3f}-{line['spread_run1'][1]:.3f}  {'ok' if line['within_spread'] else 'OUTSIDE'}")
    out = Path(__file__).parent / "results" / "bench_repeatability.json"
    out.write_text(json.dumps({"all_within_spread": all_within, "rows": lines}, indent=2) + "\n")
    print(f"all medians within the reported spread: {all_within}; saved {out}")


if __name__ == "__main__":
    main()
