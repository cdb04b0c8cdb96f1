import pytest

from conftest import run_cli

COMMANDS = ["doctor", "models", "import", "eval", "train-teacher", "distill", "export", "bench", "quickstart"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_explains_itself(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and len(result.output) > 300


def test_doctor_reports_what_a_bug_report_needs(tmp_path):
    import json

    result = run_cli("doctor", "--json", tmp_path / "env.json")
    assert result.exit_code == 0
    facts = json.loads((tmp_path / "env.json").read_text())
    for key in ("python", "torch", "cuda_available", "gpu", "cudnn", "onnxruntime", "onnxruntime_providers",
                "tensorrt", "cpu", "cpu_cores", "jetson"):
        assert key in facts
    assert facts["tensorrt"]  # a version or "not installed"
    # What --amp auto detected and picks here: bf16 only with native bf16 instructions (or a GPU that has them).
    assert isinstance(facts["cpu_bf16_instructions"], list)
    if not facts["cuda_available"]:
        assert (facts["amp_auto"] == "bfloat16") == bool(facts["cpu_bf16_instructions"])


@pytest.mark.parametrize("args,expected", [
    (["eval", "missing.pt", "--data", "digits"], "checkpoint not found"),
    (["models", "--torchvision", "nothing*"], None),
    (["distill", "--teacher", "missing.pt", "--out", "x"], "checkpoint not found"),
    (["bench", "--student", "a", "--data", "digits", "--out", "x"], "--teacher"),
    (["train-teacher", "--data", "nowhere", "--arch", "digits_cnn", "--out", "x"], "unknown data source"),
])
def test_bad_input_gives_a_clear_error_not_a_traceback(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert "Traceback" not in result.output
    if expected:
        assert result.exit_code == 2 and expected in result.output


def test_an_output_path_the_file_system_refuses_is_one_line(digits_teacher, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli("export", digits_teacher, "--out", tmp_path / "a-file" / "export")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Not a directory" in result.output and "a-file" in result.output
