"""The bench folder's figures, drawn from report.json: tradeoff.png (accuracy against latency, one marker per backend
and precision, one colour per model) and confusion.png (each model's confusion matrix).

matplotlib is optional (the plot extra) and imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..progress import log

MODEL_COLOURS = {"teacher": "#d62728", "student": "#1f77b4"}
# Shapes that stay distinct where points overlap: a row is identified by its shape, the model by its colour.
ROW_MARKERS = {("torch", "fp32"): "o", ("torch", "fp16"): "D", ("onnxruntime", "fp32"): "s",
               ("onnxruntime", "fp16"): "P", ("onnxruntime", "int8"): "X", ("tensorrt", "fp32"): "^",
               ("tensorrt", "fp16"): "v", ("tensorrt", "int8"): "*"}
MARKER_POINTS = 12  # marker size, and the step between markers spread apart
ANNOTATED_CLASSES = 12  # up to this many classes each confusion cell shows its percentage
NAMED_CLASSES = 30  # up to this many classes every tick is named


def pyplot(figure_name: str):
    """matplotlib.pyplot with a file-only backend, or None (with a note) when the plot extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"{figure_name} skipped: matplotlib is not installed (pip install 'dfad-edge[plot]')")
        return None
    return plt


def _timed_rows(report: dict) -> list[dict]:
    return [row for row in report["results"] if "skipped" not in row and row.get("latency_ms")]


def _data_name(report: dict) -> str:
    """The data's name for a title: a long ImageFolder path is cut to its last two folders."""
    data = report["data"]
    return data if len(data) <= 40 else ".../" + "/".join(Path(data).parts[-2:])


def tradeoff_plot(report: dict, path: Path) -> bool:
    """Top-1 against p50 latency at the smallest batch, with p10-p90 bars; a legend beside the axes names every colour
    and shape, so no label can cover a point."""
    rows = _timed_rows(report)
    plt = pyplot("tradeoff.png") if rows else None
    if plt is None:
        return False
    from matplotlib.transforms import offset_copy

    batch = min((b for row in rows for b in row["latency_ms"]), key=int)
    rows = [row for row in rows if batch in row["latency_ms"]]
    figure, axes = plt.subplots(figsize=(8.5, 4.8))
    figure.subplots_adjust(left=0.09, right=0.68, bottom=0.12, top=0.92)  # the legend goes right of the axes
    _set_limits(axes, rows, batch)
    points = [(row["latency_ms"][batch]["p50"], 100 * row["accuracy"]["100%"]) for row in rows]
    for row, (p50, accuracy), nudge in zip(rows, points, _spread_overlaps(axes, figure, points)):
        shifted = offset_copy(axes.transData, figure, y=nudge, units="points")
        colour, stats = MODEL_COLOURS[row["model"]], row["latency_ms"][batch]
        axes.plot([stats["p10"], stats["p90"]], [accuracy, accuracy], color=colour, alpha=0.35, linewidth=1.5,
                  transform=shifted, zorder=1)
        axes.plot(p50, accuracy, linestyle="", marker=ROW_MARKERS[(row["backend"], row["precision"])],
                  markersize=MARKER_POINTS, markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2.0,
                  transform=shifted, zorder=2)
    _tradeoff_legend(axes, rows)
    axes.set_xlabel(f"p50 latency at batch {batch}, ms (log scale; bars: p10-p90)")
    axes.set_ylabel("top-1 accuracy, full test set (%)")
    axes.set_title(f"accuracy against latency on {_data_name(report)} ({rows[0]['device']})")
    axes.grid(alpha=0.3, which="both")
    figure.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(figure)
    return True


def _set_limits(axes, rows: list[dict], batch: str) -> None:
    """Fixed limits with a margin, so marker positions on the page are known before they are drawn."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low = min(row["latency_ms"][batch]["p10"] for row in rows)
    high = max(row["latency_ms"][batch]["p90"] for row in rows)
    margin = max(1.3, (high / low) ** 0.08)
    axes.set_xscale("log")
    axes.set_xlim(low / margin, high * margin)
    # Ticks at 1, 2 and 5 per decade written as plain numbers: within a decade matplotlib would label every minor
    # tick in 10^x notation, and those labels run into each other.
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    accuracies = [100 * row["accuracy"]["100%"] for row in rows]
    pad = max(1.0, 0.12 * (max(accuracies) - min(accuracies)))
    axes.set_ylim(min(accuracies) - pad, max(accuracies) + pad)


def _spread_overlaps(axes, figure, points: list[tuple[float, float]]) -> list[float]:
    """Vertical nudges (in points) for markers that would cover each other. Rows of one model often share its
    accuracy and nearly its latency (ONNX Runtime FP16 and INT8 on a CPU): such a run of markers, each closer than a
    marker's width to the last, is spread evenly above and below its accuracy line."""
    width = MARKER_POINTS * figure.dpi / 72  # in display pixels
    on_page = axes.transData.transform(points)
    order = sorted(range(len(points)), key=lambda i: (round(on_page[i][1]), on_page[i][0]))
    nudges, run = [0.0] * len(points), []
    for index in order + [None]:
        if index is not None and run and abs(on_page[index][1] - on_page[run[-1]][1]) < 1 \
                and on_page[index][0] - on_page[run[-1]][0] < width:
            run.append(index)
            continue
        for rank, member in enumerate(run):
            nudges[member] = (rank - (len(run) - 1) / 2) * MARKER_POINTS
        run = [index]
    return nudges


def _tradeoff_legend(axes, rows: list[dict]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    # Colour swatches for the models, grey shapes for the rows: neither can be mistaken for the other.
    handles = [Patch(color=colour, label=model) for model, colour in MODEL_COLOURS.items()
               if any(r["model"] == model for r in rows)]
    shown = sorted({(r["backend"], r["precision"]) for r in rows}, key=list(ROW_MARKERS).index)
    handles += [Line2D([], [], linestyle="", marker=ROW_MARKERS[key], markersize=9, markerfacecolor="none",
                       markeredgecolor="dimgray", markeredgewidth=2.0, label=f"{key[0]} {key[1]}") for key in shown]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
                title="colour: model\nshape: backend, precision\n(markers that would overlap\nare spread vertically)",
                alignment="left")


def confusion_plot(report: dict, path: Path) -> bool:
    """The teacher's and the student's confusion matrices side by side, each row as shares of that class's images."""
    per_class = report.get("per_class")
    plt = pyplot("confusion.png") if per_class else None
    if plt is None:
        return False
    names = per_class["class_names"]
    panel = min(9.0, 2.5 + 0.32 * len(names))
    figure, axes = plt.subplots(1, 2, figsize=(2 * panel + 1.2, panel), constrained_layout=True)
    for axis, role in zip(axes, ("teacher", "student")):
        image = _confusion_panel(axis, np.asarray(per_class[role]["confusion"], dtype=float), names, role)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class's test images")
    figure.suptitle(f"confusion matrices on {_data_name(report)} (FP32 reference predictions)")
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return True


def _confusion_panel(axis, counts: np.ndarray, names: list[str], role: str):
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axis.set_title(f"{role}: top-1 {accuracy:.1%}", color=MODEL_COLOURS[role], fontweight="bold")
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    step = 1 if len(names) <= NAMED_CLASSES else int(np.ceil(len(names) / NAMED_CLASSES))
    ticks = np.arange(0, len(names), step)
    axis.set_xticks(ticks, [names[t] for t in ticks], rotation=90 if max(map(len, names)) > 3 else 0)
    axis.set_yticks(ticks, [names[t] for t in ticks])
    if len(names) <= ANNOTATED_CLASSES:
        for (true, predicted), share in np.ndenumerate(shares):
            if counts[true, predicted]:
                axis.text(predicted, true, f"{100 * share:.0f}", ha="center", va="center", fontsize=8,
                          color="white" if share > 0.5 else "black")
    return image
