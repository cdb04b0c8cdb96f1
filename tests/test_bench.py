import json

import pytest

from conftest import run_cli
from dfad_edge.bench import BenchOptions, run_bench
from dfad_edge.bench.report import compare_reports
from dfad_edge.errors import DfadError


@pytest.fixture(scope="module")
def digits_exports(digits_teacher, distilled_digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-exports")
    for role, checkpoint in (("teacher", digits_teacher), ("student", distilled_digits / "student.pt")):
        args = ["export", checkpoint, "--out", root / role, "--int8", "--generator", distilled_digits / "generator.pt"]
        assert run_cli(*args).exit_code == 0
    return root


@pytest.fixture(scope="module")
def bench_report(digits_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_cli("bench", "--teacher", digits_exports / "teacher", "--student", digits_exports / "student",
                     "--data", "digits", "--out", out, "--batch-sizes", "1,16", "--iterations", "20", "--warmup", "3",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def _row(report, model, backend, precision):
    return next(r for r in report["results"] if (r["model"], r["backend"], r["precision"]) == (model, backend, precision))


def test_every_cpu_row_runs_with_sensible_figures(bench_report):
    report = json.loads((bench_report / "report.json").read_text())
    assert report["schema"] == "dfad-edge-bench/1" and len(report["results"]) == 2 * 3 * 3
    for model in ("teacher", "student"):
        for backend, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")):
            row = _row(report, model, backend, precision)
            assert "skipped" not in row
            assert set(row["accuracy"]) == {"10%", "20%", "100%"} and row["accuracy"]["100%"] > 0.9
            latency = row["latency_ms"]["1"]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
            # Rounds of equal size: the pooled median lies between the lowest and highest round median.
            assert latency["p50_rounds"][0] <= latency["p50"] <= latency["p50_rounds"][1]
            assert row["throughput_ips"]["16"] > 0 and row["bytes"] > 0 and row["threads"] >= 1
            assert row["agreement"]["fp32"]["100%"] >= 0.9
    assert _row(report, "teacher", "torch", "fp32")["agreement"]["teacher"]["100%"] == 1.0
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    assert student["params"] < teacher["params"] and student["macs"] < teacher["macs"]
    assert "multiply-accumulates" in teacher["macs_convention"]
    assert report["env"]["onnxruntime"] and report["env"]["cpu_cores"] >= 1


def test_rows_that_cannot_run_say_why(bench_report):
    report = json.loads((bench_report / "report.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        assert "TensorRT" in _row(report, "student", "tensorrt", precision)["skipped"]
    assert "fp16" in _row(report, "student", "onnxruntime", "fp16")["skipped"]


def test_report_md_shows_student_against_teacher_and_a_plot(bench_report):
    text = (bench_report / "report.md").read_text()
    assert "Fastest student" in text and "speed-up" in text and "size reduction" in text and "accuracy kept" in text
    assert "## Skipped" in text and "Latency drift" in text
    assert (bench_report / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_puts_two_reports_side_by_side(bench_report, tmp_path):
    result = run_cli("bench", "compare", bench_report / "report.json", bench_report / "report.json",
                     "--out", tmp_path / "compare.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "compare.md").read_text()
    # A report against itself: every ratio is 1.00 and every median lies inside its own spread.
    assert "| student | onnxruntime | int8 |" in text and "1.00 | yes |" in text and "| no |" not in text
    report = json.loads((bench_report / "report.json").read_text())
    assert "not in B" in compare_reports(report, {**report, "results": []})


def test_bad_bench_input_is_a_clear_error(digits_exports, tmp_path):
    with pytest.raises(DfadError, match="unknown"):
        run_bench(digits_exports / "teacher", digits_exports / "student", "digits", tmp_path,
                  BenchOptions(backends=["tflite"]))
    result = run_cli("bench", "--teacher", digits_exports / "teacher", "--data", "digits", "--out", tmp_path)
    assert result.exit_code == 2 and "--student" in result.output


def test_threads_option_sets_both_runtimes_and_is_restored(digits_exports, tmp_path):
    import torch

    before = torch.get_num_threads()
    report = run_bench(digits_exports / "teacher", digits_exports / "student", "digits", tmp_path,
                       BenchOptions(backends=["torch", "onnxruntime"], precisions=["fp32"], batch_sizes=[1],
                                    iterations=2, warmup=0, rounds=1, threads=1, device="cpu"))
    assert {row["threads"] for row in report["results"]} == {1}
    assert torch.get_num_threads() == before
