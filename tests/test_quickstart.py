import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_quickstart_runs_the_whole_pipeline_and_the_student_keeps_95_percent(tmp_path):
    out = tmp_path / "qs"
    result = run_cli("quickstart", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Like for like" in result.output and "of the teacher's accuracy" in result.output
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["kept"] >= 0.95
    for path in ("teacher/teacher.pt", "distill/student.pt", "distill/generator.pt", "export-student/model.int8.onnx",
                 "export-teacher/model.onnx", "bench/report.json", "bench/report.md", "bench/tradeoff.png",
                 "bench/confusion.png"):
        assert (out / path).is_file(), path
    again = run_cli("quickstart", "--out", out)
    assert again.exit_code == 2 and "--force" in again.output
