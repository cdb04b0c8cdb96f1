"""The whole pipeline on the built-in digits data in a few minutes, no download: train a teacher, distill a student
data-free, export ONNX/FP16/INT8 (calibrated on the synthetic images), bench everything."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from .bench import BenchOptions, run_bench
from .checkpoint import load_checkpoint
from .distill import DistillRun, preset_config, teacher_kind
from .errors import DfadError
from .export import ExportOptions, run_export
from .io import atomic_write_json
from .progress import log
from .train_teacher import TeacherConfig, train_teacher


def run_quickstart(out: Path, seed: int = 0, device: str = "auto", force: bool = False) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise DfadError(f"{out} is not empty: pass --force to replace it, or choose another --out")
        shutil.rmtree(out)
    log("[bold]1/5[/] training a digits teacher (supervised; a real user imports theirs)")
    teacher = train_teacher(TeacherConfig(data="digits", arch="digits_cnn", epochs=20, batch_size=64, lr=0.05,
                                          seed=seed, device=device), out / "teacher")
    teacher_path = Path(teacher["teacher"])
    log("[bold]2/5[/] distilling a student without data (the default method for the teacher's kind of data)")
    teacher_height = load_checkpoint(teacher_path).input_spec.height
    distill_config = replace(preset_config("auto", "auto", teacher_kind(teacher_height)), seed=seed, device=device)
    distilled = DistillRun(distill_config, teacher_path, out / "distill", eval_data="digits").run()
    synthetic = out / "distill" / "synthetic.pt"
    log("[bold]3/5[/] exporting the student: ONNX, FP16, INT8 calibrated on its synthetic images")
    run_export(out / "distill" / "student.pt", out / "export-student", ExportOptions(int8=True, fp16=True, seed=seed))
    log("[bold]4/5[/] exporting the teacher the same way, for a fair comparison")
    run_export(teacher_path, out / "export-teacher", ExportOptions(int8=True, fp16=True, synthetic=str(synthetic), seed=seed))
    log("[bold]5/5[/] benchmarking student against teacher")
    run_bench(out / "export-teacher", out / "export-student", "digits", out / "bench",
              BenchOptions(batch_sizes=[1, 64], warmup=10, iterations=50, device=device))
    teacher_accuracy = teacher["test_accuracy"]["100%"]
    student_accuracy = distilled["shipped"]["test_accuracy"]["100%"]
    summary = {"teacher_accuracy": teacher_accuracy, "student_accuracy": student_accuracy,
               "kept": student_accuracy / teacher_accuracy, "seed": seed, "student_epoch": distilled["shipped"]["epoch"],
               "selection": distilled["shipped"]["selection"], "report": str(out / "bench" / "report.md")}
    atomic_write_json(out / "quickstart.json", summary)
    return summary
