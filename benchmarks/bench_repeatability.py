"""Are bench latency medians stable? Runs the same `dfad-edge bench` command twice, each in its own process as a user
would, and checks, for every row, that each run's
p50 lies within the spread the other run reported: the per-iteration p10-p90, and (stricter) the range of per-round
medians (`p50_rounds`).

    python benchmarks/bench_repeatability.py --teacher T_EXPORT --student S_EXPORT --data SRC [--device cpu]

Saves benchmarks/results/bench_repeatability.json and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dfad_edge.bench.report import within_spread


def _within(value: float, low: float, high: float) -> bool:
    return low <= value <= high


def compare_rows(first: dict, second: dict) -> list[dict]:
    lines = []
    for row in (r for r in first["results"] if "skipped" not in r):
        other = next(r for r in second["results"]
                     if (r["model"], r["backend"], r["precision"]) == (row["model"], row["backend"], row["precision"]))
        for batch, a in row["latency_ms"].items():
            b = other["latency_ms"][batch]
            lines.append({"row": f"{row['model']} {row['backend']} {row['precision']} b{batch}",
                          "p50_run1": a["p50"], "p50_run2": b["p50"],
                          "p10_p90_run1": [a["p10"], a["p90"]], "p10_p90_run2": [b["p10"], b["p90"]],
                          "p50_rounds_run1": a["p50_rounds"], "p50_rounds_run2": b["p50_rounds"],
                          "within_p10_p90": within_spread(a, b["p50"]) and within_spread(b, a["p50"]),
                          "within_round_range": (_within(b["p50"], *a["p50_rounds"]) and _within(a["p50"], *b["p50_rounds"]))})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    command = [sys.executable, "-m", "dfad_edge", "bench", "--teacher", str(args.teacher), "--student", str(args.student),
               "--data", args.data, "--device", args.device, "--backends", "torch,onnxruntime", "--precisions", "fp32,int8",
               "--batch-sizes", args.batch_sizes, "--iterations", str(args.iterations), "--rounds", str(args.rounds)]
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in (1, 2):
            out = Path(scratch) / f"run{index}"
            subprocess.run(command + ["--out", str(out)], check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads((out / "report.json").read_text()))
    lines = compare_rows(*runs)
    for line in lines:
        print(f"{line['row']:36s} p50 {line['p50_run1']:9.3f} / {line['p50_run2']:9.3f} ms  "
              f"p10-p90 {line['p10_p90_run1'][0]:.3f}-{line['p10_p90_run1'][1]:.3f}  "
              f"{'ok' if line['within_p10_p90'] else 'OUTSIDE'}  rounds {'ok' if line['within_round_range'] else 'OUTSIDE'}")
    summary = {"rows": len(lines), "within_p10_p90": sum(l["within_p10_p90"] for l in lines),
               "within_round_range": sum(l["within_round_range"] for l in lines),
               "minutes": round((time.time() - started) / 60, 1), "cpu": runs[0]["env"]["cpu"],
               "settings": runs[0]["settings"]}
    out = Path(__file__).parent / "results" / "bench_repeatability.json"
    out.write_text(json.dumps({**summary, "pairs": lines}, indent=2) + "\n")
    print(f"{summary['within_p10_p90']}/{summary['rows']} rows: each run's median inside the other's p10-p90; "
          f"{summary['within_round_range']}/{summary['rows']} inside the other's per-round median range; saved {out}")


if __name__ == "__main__":
    main()
