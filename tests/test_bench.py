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
        # Both calibrated data-free, on the images the distillation synthesised.
        args = ["export", checkpoint, "--out", root / role, "--int8", "--synthetic", distilled_digits / "synthetic.pt"]
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


def test_every_cpu_row_runs_with_figures_that_agree_with_each_other(bench_report):
    report = json.loads((bench_report / "report.json").read_text())
    assert report["schema"] == "dfad-edge-bench/1" and len(report["results"]) == 2 * 3 * 3
    for model in ("teacher", "student"):
        for backend, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")):
            row = _row(report, model, backend, precision)
            assert "skipped" not in row
            assert set(row["accuracy"]) == {"10%", "20%", "100%"} and row["accuracy"]["100%"] > 0.9
            latency = row["latency_ms"]["16"]
            assert latency["iterations"] == 20
            # Throughput is batch / median latency: a mix-up of batch sizes or units shows here.
            assert row["throughput_ips"]["16"] == pytest.approx(16 / (latency["p50"] / 1000), rel=1e-3)
            assert row["bytes"] > 0 and row["threads"] >= 1
            assert row["agreement"]["fp32"]["100%"] >= 0.9
    # The ONNX FP32 graph computes what PyTorch computes.
    assert _row(report, "student", "onnxruntime", "fp32")["agreement"]["fp32"]["100%"] == 1.0
    assert _row(report, "teacher", "torch", "fp32")["agreement"]["teacher"]["100%"] == 1.0
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    assert student["params"] < teacher["params"] and student["macs"] < teacher["macs"]
    assert "multiply-accumulates" in teacher["macs_convention"]
    assert report["env"]["onnxruntime"] and report["env"]["cpu_cores"] >= 1


def test_latency_statistics_come_from_the_timed_calls(monkeypatch):
    """A fake backend whose call 'takes' batch x (1 ms, 2 ms, 3 ms, ...) on a fake clock: every figure is known."""
    import dfad_edge.bench.latency as latency

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(latency.time, "sleep", lambda _s: None)

    class Backend:
        max_batch = None

        def predict(self, images):
            clock["calls"] += 1
            clock["now"] += len(images) * 1e-3 * (1 + clock["calls"] % 10)

        def device_compute_ms(self, images, iterations, warmup):
            return None

    result = latency.measure_interleaved({"row": (Backend(), (1, 2, 2))}, [1, 4], iterations=10, warmup=0, rounds=2)
    stats = result["row"]["latency_ms"]["4"]
    assert stats["iterations"] == 10 and 4.0 <= stats["p10"] <= stats["p50"] <= stats["p90"] <= 40.0
    assert stats["p50_rounds"][0] <= stats["p50"] <= stats["p50_rounds"][1]
    assert result["row"]["throughput_ips"]["4"] == pytest.approx(4 / (stats["p50"] / 1000), rel=1e-2)  # rounded
    assert result["row"]["latency_ms"]["1"]["p50"] * 4 == pytest.approx(stats["p50"], rel=0.5)


def test_rows_that_cannot_run_say_why(bench_report):
    report = json.loads((bench_report / "report.json").read_text())
    for precision in ("fp32", "fp16", "int8"):
        assert "TensorRT" in _row(report, "student", "tensorrt", precision)["skipped"]
    assert "fp16" in _row(report, "student", "onnxruntime", "fp16")["skipped"]


def test_report_md_compares_like_with_like_and_has_a_plot(bench_report):
    text = (bench_report / "report.md").read_text()
    report = json.loads((bench_report / "report.json").read_text())
    headline = next(line for line in text.splitlines() if line.startswith("**Like for like"))
    backend, precision = headline.split("(", 1)[1].split(",")[0].split()
    student, teacher = _row(report, "student", backend, precision), _row(report, "teacher", backend, precision)
    speedup = teacher["latency_ms"]["1"]["p50"] / student["latency_ms"]["1"]["p50"]
    assert f"{speedup:.1f}x faster than the teacher in the same backend and precision" in headline
    assert "speed-up" in text and "size reduction" in text and "accuracy kept" in text
    # Any ratio across runtimes is labelled as such in its own sentence.
    for line in text.splitlines():
        if "Fastest against fastest" in line:
            assert "different runtimes" in line and "mixes" in line
    assert "## Skipped" in text and "Latency drift" in text
    assert (bench_report / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_marks_a_real_slowdown_and_not_the_noise(bench_report, tmp_path):
    import copy

    report = json.loads((bench_report / "report.json").read_text())
    slower = copy.deepcopy(report)
    row = _row(slower, "student", "onnxruntime", "int8")
    row["latency_ms"]["16"]["p50"] *= 3  # far outside its own p10-p90
    (tmp_path / "b.json").write_text(json.dumps(slower))
    result = run_cli("bench", "compare", bench_report / "report.json", tmp_path / "b.json", "--out", tmp_path / "c.md")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "c.md").read_text().splitlines()
    changed = next(line for line in lines if line.startswith("| student | onnxruntime | int8 |") and "| 16 |" in line)
    assert changed.endswith("| 3.00 | no |")
    unchanged = next(line for line in lines if line.startswith("| teacher | torch | fp32 |") and "| 16 |" in line)
    assert unchanged.endswith("| 1.00 | yes |")
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


def test_per_class_accuracy_and_confusion_matrices_are_in_the_report(bench_report, digits_teacher, distilled_digits):
    import numpy as np
    import torch

    from dfad_edge.evaluate import evaluate_checkpoint

    report = json.loads((bench_report / "report.json").read_text())
    per_class = report["per_class"]
    assert per_class["class_names"] == [str(i) for i in range(10)] and sum(per_class["images"]) == 450
    # Streaming the test set through a loader gives the eval command's accuracy exactly.
    for model, checkpoint in (("teacher", digits_teacher), ("student", distilled_digits / "student.pt")):
        evaluated = evaluate_checkpoint(checkpoint, "digits", torch.device("cpu"))["accuracy"]
        assert _row(report, model, "torch", "fp32")["accuracy"] == evaluated
    for model in ("teacher", "student"):
        confusion = np.asarray(per_class[model]["confusion"])
        assert confusion.shape == (10, 10) and confusion.sum(1).tolist() == per_class["images"]
        assert np.trace(confusion) / 450 == pytest.approx(_row(report, model, "torch", "fp32")["accuracy"]["100%"])
        assert per_class[model]["accuracy"][3] == pytest.approx(confusion[3, 3] / confusion[3].sum())
    assert not any("accuracy_top5" in row for row in report["results"])  # 10 classes: top-1 only
    assert "## Per class" in (bench_report / "report.md").read_text()
    assert (bench_report / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_reports_are_written_and_the_figures_skipped(bench_report, tmp_path, monkeypatch):
    import sys

    from dfad_edge.bench.report import load_report, write_reports

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without the plot extra
    write_reports(load_report(bench_report / "report.json"), tmp_path)
    assert "## Per class" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "tradeoff.png").exists() and not (tmp_path / "confusion.png").exists()
