"""The whole pipeline on the built-in digits data in a few minutes, no download: train a teacher, distill a student
data-free, export ONNX/FP16/INT8 (calibrated from the generator), bench everything."""

from __future__ import annotations

import shutil
from pathlib import Path

from .bench import BenchOptions, run_bench
from .distill import DistillRun, preset_config
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
    log("[bold]2/5[/] distilling a student without data (generator vs student, teacher as judge)")
    distill_config = preset_config("digits", seed=seed, device=device)
    distilled = DistillRun(distill_config, teacher_path, out / "distill", eval_data="digits").run()
    generator = out / "distill" / "generator.pt"
    log("[bold]3/5[/] exporting the student: ONNX, FP16, INT8 calibrated on generator images")
    run_export(out / "distill" / "student.pt", out / "export-student", ExportOptions(int8=True, fp16=True, seed=seed))
    log("[bold]4/5[/] exporting the teacher the same way, for a fair comparison")
    run_export(teacher_path, out / "export-teacher", ExportOptions(int8=True, fp16=True, generator=str(generator), seed=seed))
    log("[bold]5/5[/] benchmarking student against teacher")
    run_bench(out / "export-teacher", out / "export-student", "digits", out / "bench",
              BenchOptions(batch_sizes=[1, 64], warmup=10, iterations=50, device=device))
    summary = {"teacher_accuracy": teacher["best_accuracy"], "student_accuracy": distilled["best"]["accuracy"]["100%"],
               "kept": distilled["best"]["accuracy"]["100%"] / teacher["best_accuracy"], "seed": seed,
               "report": str(out / "bench" / "report.md")}
    atomic_write_json(out / "quickstart.json", summary)
    return summary
