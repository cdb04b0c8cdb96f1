"""The scripts under tools/: the reproduction script end to end (tiny budgets on digits), and the helpers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _run(*args, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    # The venv's bin (dfad-edge, python) first on PATH, as after `pip install` in an activated venv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DFAD_EDGE_QUIET": "1",
           **(env_extra or {})}
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


SMOKE = {"SMOKE": "1", "DATA": "digits", "TEACHER_ARCH": "digits_cnn", "STUDENT": "digits_cnn_small", "DEVICE": "cpu"}
STEP_OUTPUTS = ("teacher/teacher.pt", "teacher/eval.json", "distill/result.json", "distill/student.pt",
                "export-student/export.json", "export-teacher/model.int8.onnx", "bench/report.json", "bench/report.md")


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro") / "run"
    result = _run("bash", TOOLS / "cifar100_reproduce.sh", root, env_extra=SMOKE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result


def test_reproduction_script_runs_every_step_under_one_folder(reproduction):
    root, result = reproduction
    for relative in STEP_OUTPUTS:
        assert (root / relative).is_file(), relative
    # No TensorRT here: the engines are skipped with the reason, everything else is kept.
    assert "TensorRT engines for the student were not built" in result.stdout
    report = json.loads((root / "bench" / "report.json").read_text())
    assert {r["model"] for r in report["results"] if "skipped" not in r} == {"teacher", "student"}
    assert "| epoch |" in result.stdout and (root / "distill" / "progress.png").is_file()


def test_reproduction_script_skips_finished_steps_and_resumes_distillation(reproduction):
    root, _ = reproduction
    stamps = {relative: (root / relative).stat().st_mtime_ns for relative in STEP_OUTPUTS}
    (root / "distill" / "result.json").unlink()  # as if the distillation had been interrupted after its last.pt
    result = _run("bash", TOOLS / "cifar100_reproduce.sh", root, env_extra=SMOKE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming" in result.stdout + result.stderr and (root / "distill" / "result.json").is_file()
    unchanged = [r for r in STEP_OUTPUTS if r != "distill/result.json"]
    assert all((root / r).stat().st_mtime_ns == stamps[r] for r in unchanged)


def test_render_report_rebuilds_markdown_and_plot_from_json(reproduction, tmp_path):
    root, _ = reproduction
    result = _run(sys.executable, TOOLS / "render_report.py", root / "bench" / "report.json", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Student vs teacher" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_tools_fail_with_one_line_not_a_traceback(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    for args in ((TOOLS / "render_report.py", tmp_path / "report.json"), (TOOLS / "summarize_run.py", tmp_path),
                 (TOOLS / "trt_layer_precisions.py", tmp_path / "model.int8.engine")):
        result = _run(sys.executable, *args)
        assert result.returncode != 0 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_gpu_check_plumbing_runs_on_a_cpu_and_says_which_steps_need_a_gpu(tmp_path):
    result = _run("bash", TOOLS / "gpu_check.sh", tmp_path / "check", "--smoke", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    status = {step["step"]: step for step in summary["steps"]}
    skipped = [s for s in status.values() if s["status"] == "skipped"]
    # fp16 with gradient scaling and torch.compile are CUDA paths: skipped on a CPU, each saying why.
    assert {s["step"] for s in skipped} == {"distill, fp16 with gradient scaling, method dfad",
                                            "distill, fp16 with gradient scaling, method pool", "distill, torch.compile"}
    assert all("needs a CUDA GPU" in s["why"] for s in skipped)
    assert all(s["status"] == "ok" for s in status.values() if s not in skipped), status
    assert summary["figures"]["distill-bf16"]["test_top1"] > 0.2  # the smoke student learnt something
    assert any(row["backend"] == "onnxruntime" and not row["skipped"] for row in summary["figures"]["bench"])
    assert (tmp_path / "check" / "distill_throughput.json").is_file()  # in the check's folder, not the repository's
    # The ImageNet-size recipe ran every step with the large-image defaults (a 72-px teacher is one by size).
    recipe = tmp_path / "check" / "imagenet-recipe-smoke"
    assert json.loads((recipe / "distill" / "config.json").read_text())["preset"] == "large"
    assert (recipe / "bench" / "report.json").is_file()
    markdown = (tmp_path / "check" / "gpu_check.md").read_text()
    assert "needs a CUDA GPU" in markdown and "| skipped |" in markdown
