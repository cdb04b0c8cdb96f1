"""Summarise a distillation run folder: accuracy against training time and the mode-collapse diagnostics.

    python tools/summarize_run.py RUN_DIR [--plot RUN_DIR/progress.png]

Prints a Markdown table (one row per epoch) and, with matplotlib installed, plots accuracy and class entropy
against training minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def top1(metric: dict, key: str) -> str:
    return f"{metric[key]['100%']:.2%}" if metric.get(key) else ""


def markdown(metrics: list[dict]) -> str:
    # A run that ships a weight average (average_epochs) also shows the student as trained.
    averaged = any("accuracy_unaveraged" in m for m in metrics)
    extra = (" unaveraged top-1 |", "---|") if averaged else ("", "")
    lines = [f"| epoch | train min | student top-1 |{extra[0]} student loss | classes hit | class entropy | "
             "image diversity | warning |", f"|---|---|---|{extra[1]}---|---|---|---|---|"]
    for m in metrics:
        c = m["collapse"]
        unaveraged = f" {top1(m, 'accuracy_unaveraged')} |" if averaged else ""
        lines.append(f"| {m['epoch']} | {m['elapsed_s'] / 60:.1f} | {top1(m, 'accuracy')} |{unaveraged} "
                     f"{m['loss_student']:.3f} | {c['classes_predicted']} | {c['class_entropy']:.2f} | "
                     f"{c['image_diversity']:.2f} | {'yes' if m.get('warning') else ''} |")
    return "\n".join(lines)


def plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [m for m in metrics if m.get("accuracy")]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot([m["elapsed_s"] / 60 for m in evaluated], [100 * m["accuracy"]["100%"] for m in evaluated], "o-",
              color="tab:blue", label="student top-1 (%)")
    unaveraged = [m for m in evaluated if m.get("accuracy_unaveraged")]
    if unaveraged:
        left.plot([m["elapsed_s"] / 60 for m in unaveraged], [100 * m["accuracy_unaveraged"]["100%"] for m in unaveraged],
                  "o:", color="tab:gray", label="student as trained, unaveraged (%)")
    left.set_xlabel("training time (min)")
    left.set_ylabel("student top-1 (%)")
    right = left.twinx()
    right.plot([m["elapsed_s"] / 60 for m in metrics], [m["collapse"]["class_entropy"] for m in metrics], "s--",
               color="tab:orange", label="class entropy (1 = balanced)")
    right.set_ylim(0, 1.05)
    right.set_ylabel("teacher class entropy on synthetic images")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if not (args.run / "metrics.jsonl").is_file():
        sys.exit(f"error: {args.run} is not a distillation run folder (no metrics.jsonl; dfad-edge distill --out writes one)")
    metrics = load_metrics(args.run)
    print(markdown(metrics))
    result = args.run / "result.json"
    if result.exists():
        print("\n" + result.read_text())
    if args.plot:
        plot(metrics, args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
