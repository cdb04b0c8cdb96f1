"""report.json -> report.md (the table a person reads), tradeoff.png and confusion.png; and side-by-side comparison of
two reports."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DfadError
from ..io import atomic_write_text
from .plots import confusion_plot, tradeoff_plot


def _ran(report: dict) -> list[dict]:
    return [row for row in report["results"] if "skipped" not in row]


def _find(report: dict, model: str, backend: str, precision: str) -> dict | None:
    return next((r for r in _ran(report) if (r["model"], r["backend"], r["precision"]) == (model, backend, precision)), None)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f}"


def _largest_batch(row: dict) -> str:
    return max(row["latency_ms"], key=int)


def within_spread(stats: dict, p50: float) -> bool:
    """Whether another run's median lies inside this row's per-call p10-p90: the test for "beyond noise"."""
    return stats["p10"] <= p50 <= stats["p90"]


def _shared_batches(first: dict, second: dict) -> list[str]:
    """Batch sizes measured in both rows (an engine may be limited to a smaller batch range)."""
    return sorted(set(first["latency_ms"]) & set(second["latency_ms"]), key=int)


def precision_label(row: dict) -> str:
    """The artifact's precision, and what the arithmetic really was where that differs (computes_in in JSON)."""
    return f"{row['precision']}, run in {row['computes_in'].split(' (')[0]}" if row.get("computes_in") else row["precision"]


def results_table(report: dict) -> list[str]:
    # Top-5 where the data set has more than 10 classes (bench records it there only).
    top5 = any("accuracy_top5" in row for row in _ran(report))
    lines = ["| model | backend | precision | top-1 10% | top-1 20% | top-1 100% | " + ("top-5 100% | " if top5 else "")
             + "agrees w/ teacher | agrees w/ own FP32 "
             "| p50 ms (batch 1) | p90 ms (batch 1) | p50 ms (largest batch) | img/s (largest batch) | MiB |",
             "|---|---|---|---|---|---|" + ("---|" if top5 else "") + "---|---|---|---|---|---|---|"]
    for row in _ran(report):
        largest = _largest_batch(row)
        first = min(row["latency_ms"], key=int)
        acc = row["accuracy"]
        lines.append(
            f"| {row['model']} | {row['backend']} | {precision_label(row)} | {acc['10%']:.2%} | {acc['20%']:.2%} | "
            f"{acc['100%']:.2%} | " + (f"{row['accuracy_top5']['100%']:.2%} | " if top5 else "") +
            f"{row['agreement']['teacher']['100%']:.2%} | {row['agreement']['fp32']['100%']:.2%} | "
            f"{row['latency_ms'][first]['p50']:.3f} (b{first}) | {row['latency_ms'][first]['p90']:.3f} | "
            f"{row['latency_ms'][largest]['p50']:.3f} (b{largest}) | {row['throughput_ips'][largest]:,.0f} | {_mib(row['bytes'])} |")
    return lines


def _fastest(rows: list[dict], batch: str) -> dict:
    return min((r for r in rows if batch in r["latency_ms"]), key=lambda r: r["latency_ms"][batch]["p50"])


def _comparison(student: dict, teacher: dict, batch: str) -> tuple[float, float, float]:
    """Speed-up at this batch, size reduction and share of the teacher's accuracy kept."""
    speedup = teacher["latency_ms"][batch]["p50"] / student["latency_ms"][batch]["p50"]
    kept = student["accuracy"]["100%"] / max(teacher["accuracy"]["100%"], 1e-9)
    return speedup, teacher["bytes"] / student["bytes"], kept


def headline(report: dict) -> list[str]:
    """The shipping decision, like for like: the student's fastest deployment against the teacher in the same backend
    and precision; then each model's fastest against the other's, saying so when the runtimes differ."""
    students = [r for r in _ran(report) if r["model"] == "student"]
    teachers = [r for r in _ran(report) if r["model"] == "teacher"]
    shared = sorted({b for r in students for b in r["latency_ms"]} & {b for r in teachers for b in r["latency_ms"]}, key=int)
    if not shared:
        return []
    batch = shared[0]
    best_student, best_teacher = _fastest(students, batch), _fastest(teachers, batch)
    lines = []
    same = _find(report, "teacher", best_student["backend"], best_student["precision"])
    if same is not None and batch in same["latency_ms"]:
        speedup, smaller, kept = _comparison(best_student, same, batch)
        lines.append(f"**Like for like ({best_student['backend']} {best_student['precision']}, batch {batch}):** the student "
                     f"is {speedup:.1f}x faster than the teacher in the same backend and precision "
                     f"({best_student['latency_ms'][batch]['p50']:.3f} ms against {same['latency_ms'][batch]['p50']:.3f} ms), "
                     f"{smaller:.1f}x smaller, and keeps {kept:.1%} of its accuracy "
                     f"({best_student['accuracy']['100%']:.2%} against {same['accuracy']['100%']:.2%}).")
    runtimes = (best_student["backend"], best_student["precision"]), (best_teacher["backend"], best_teacher["precision"])
    speedup, _smaller, kept = _comparison(best_student, best_teacher, batch)
    if runtimes[0] == runtimes[1]:
        lines.append(f"Each model is fastest in {' '.join(runtimes[0])}, so that is also the fastest-against-fastest figure.")
    else:
        lines.append(f"**Fastest against fastest (different runtimes):** the student in {' '.join(runtimes[0])} against "
                     f"the teacher in {' '.join(runtimes[1])}, batch {batch}: {speedup:.1f}x "
                     f"({best_student['latency_ms'][batch]['p50']:.3f} ms against "
                     f"{best_teacher['latency_ms'][batch]['p50']:.3f} ms), keeping {kept:.1%} of its accuracy; this ratio "
                     "mixes the smaller model with the faster runtime.")
    return lines + [""]


def student_vs_teacher_table(report: dict) -> list[str]:
    lines = ["| backend | precision | speed-up (batch 1) | throughput ratio (largest batch) | size reduction "
             "| accuracy kept (100%) | student top-1 | teacher top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for student in (r for r in _ran(report) if r["model"] == "student"):
        teacher = _find(report, "teacher", student["backend"], student["precision"])
        batches = _shared_batches(student, teacher) if teacher else []
        if not batches:
            continue
        first, largest = batches[0], batches[-1]
        speedup = teacher["latency_ms"][first]["p50"] / student["latency_ms"][first]["p50"]
        throughput = student["throughput_ips"][largest] / teacher["throughput_ips"][largest]
        kept = student["accuracy"]["100%"] / max(teacher["accuracy"]["100%"], 1e-9)
        lines.append(f"| {student['backend']} | {student['precision']} | {speedup:.2f}x | {throughput:.2f}x | "
                     f"{teacher['bytes'] / student['bytes']:.1f}x smaller | {kept:.1%} | "
                     f"{student['accuracy']['100%']:.2%} | {teacher['accuracy']['100%']:.2%} |")
    return lines


def latency_drift(report: dict) -> list[str]:
    """How far the median moved between timing rounds in the noisiest row: the noise floor for reading this report."""
    drifts = [(max(stats["p50_rounds"][1] - stats["p50"], stats["p50"] - stats["p50_rounds"][0]) / stats["p50"], row, batch)
              for row in _ran(report) for batch, stats in row["latency_ms"].items() if "p50_rounds" in stats]
    if not drifts:
        return []
    drift, row, batch = max(drifts, key=lambda item: item[0])
    low, high = row["latency_ms"][batch]["p50_rounds"]
    return [f"Latency drift: per-round medians of the noisiest row ({row['model']} {row['backend']} {row['precision']}, "
            f"batch {batch}) ran from {low:.3f} to {high:.3f} ms, up to {drift:.0%} from its median. Latency differences "
            "smaller than that are within this machine's noise; compare ratios within one report.", ""]


PER_CLASS_ROWS = 20  # more classes than this: only the classes the student loses most on


def per_class_table(report: dict) -> list[str]:
    """Top-1 of teacher and student for each class (FP32 reference predictions; confusion.png has the matrices)."""
    per_class = report.get("per_class")
    if not per_class:
        return []
    names, images = per_class["class_names"], per_class["images"]
    teacher, student = per_class["teacher"]["accuracy"], per_class["student"]["accuracy"]
    shown = [c for c in range(len(names)) if images[c]]
    title = "each class"
    if len(shown) > PER_CLASS_ROWS:
        shown = sorted(shown, key=lambda c: student[c] - teacher[c])[:PER_CLASS_ROWS]
        title = f"the {PER_CLASS_ROWS} classes where the student loses most against the teacher"
    lines = ["", f"## Per class (FP32; {title}; matrices in confusion.png)", "",
             "| class | images | teacher top-1 | student top-1 | student - teacher |", "|---|---|---|---|---|"]
    lines += [f"| {names[c]} | {images[c]} | {teacher[c]:.2%} | {student[c]:.2%} | {100 * (student[c] - teacher[c]):+.1f} pt |"
              for c in shown]
    return lines


def markdown_report(report: dict) -> str:
    env, models = report["env"], report["models"]
    gpu = env.get("gpu") or {}
    machine = f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu else f"CPU: {env['cpu']}, {env['cpu_cores']} cores"
    lines = [f"# dfad-edge bench: student vs teacher on {report['data']}", "",
             f"Machine: {machine}; torch {env['torch']}, onnxruntime {env['onnxruntime']}, TensorRT {env['tensorrt']}"
             + (f"; Jetson {env['jetson']['model']}, power mode {env['jetson']['power_mode']}" if env.get("jetson") else ""),
             f"Settings: batch sizes {report['settings']['batch_sizes']}, {report['settings']['warmup']} warm-up + "
             f"{report['settings']['iterations']} timed iterations; latency is end to end (host in, host out)"
             + ("; GPU compute alone (CUDA events) is in report.json." if gpu else "."), ""] + latency_drift(report) + [
             "## Student vs teacher", ""] + headline(report) + ["Same backend and precision:", ""]
    lines += student_vs_teacher_table(report)
    lines += ["", "## Every row", ""] + results_table(report)
    lines += per_class_table(report)
    lines += ["", "## Models", "", "| model | arch | params | MACs | checkpoint MiB |", "|---|---|---|---|---|"]
    for role, facts in models.items():
        checkpoint_bytes = facts["artifacts"].get("checkpoint")  # absent from an export folder copied without it
        lines.append(f"| {role} | {facts['arch']} | {facts['params']:,} | {facts['macs'] / 1e6:,.1f} M | "
                     f"{_mib(checkpoint_bytes) if checkpoint_bytes is not None else 'not copied'} |")
    lines.append(f"\nMACs: {next(iter(models.values()))['macs_convention']}.")
    skipped = [r for r in report["results"] if "skipped" in r]
    if skipped:
        lines += ["", "## Skipped", "", "| model | backend | precision | why |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['backend']} | {r['precision']} | {r['skipped']} |" for r in skipped]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> None:
    atomic_write_text(out / "report.md", markdown_report(report))
    tradeoff_plot(report, out / "tradeoff.png")
    confusion_plot(report, out / "confusion.png")


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DfadError(f"cannot read bench report {path}: {exc}") from None
    if report.get("schema") != "dfad-edge-bench/1":
        raise DfadError(f"{path} is not a dfad-edge bench report.json")
    return report


def _machine(report: dict) -> str:
    gpu = report["env"].get("gpu")
    return gpu["name"] if gpu else report["env"]["cpu"]


def compare_reports(first: dict, second: dict, first_label: str = "A", second_label: str = "B") -> str:
    lines = [f"A = {first_label} ({_machine(first)}), B = {second_label} ({_machine(second)})", "",
             "A change is beyond noise when B's median falls outside A's p10-p90 (last column).", "",
             "| model | backend | precision | top-1 A | top-1 B | batch | p50 ms A | p50 ms B | B/A | B inside A's p10-p90 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in _ran(first):
        other = _find(second, row["model"], row["backend"], row["precision"])
        if other is None:
            lines.append(f"| {row['model']} | {row['backend']} | {row['precision']} | {row['accuracy']['100%']:.2%} | "
                         "not in B | | | | | |")
            continue
        for batch in sorted(set(row["latency_ms"]) & set(other["latency_ms"]), key=int):
            stats, b = row["latency_ms"][batch], other["latency_ms"][batch]["p50"]
            a, inside = stats["p50"], within_spread(stats, b)
            lines.append(f"| {row['model']} | {row['backend']} | {row['precision']} | {row['accuracy']['100%']:.2%} | "
                         f"{other['accuracy']['100%']:.2%} | {batch} | {a:.3f} | {b:.3f} | {b / a:.2f} | "
                         f"{'yes' if inside else 'no'} |")
    return "\n".join(lines) + "\n"
