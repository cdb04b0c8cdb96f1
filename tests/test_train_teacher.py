import json

import pytest
import torch

from dfad_edge.checkpoint import load_checkpoint, safe_torch_load
from dfad_edge.errors import DfadError
from dfad_edge.evaluate import evaluate_checkpoint
from dfad_edge.train_teacher import TeacherConfig, train_teacher


def test_digits_teacher_reaches_97_percent(digits_teacher):
    result = evaluate_checkpoint(digits_teacher, "digits", torch.device("cpu"))
    assert result["accuracy"]["100%"] >= 0.97
    checkpoint = load_checkpoint(digits_teacher)
    assert checkpoint.provenance["command"] == "train-teacher" and checkpoint.class_names[3] == "3"
    metrics = [json.loads(line) for line in (digits_teacher.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and all("accuracy" in m for m in metrics)


def _config(epochs: int) -> TeacherConfig:
    return TeacherConfig(data="digits", arch="digits_cnn_small", epochs=epochs, batch_size=128, lr=0.05, device="cpu")


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    train_teacher(_config(4), tmp_path / "straight")

    import dfad_edge.train_teacher as module

    real_save, saves = module.atomic_torch_save, []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 2:  # killed right after epoch 2's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(_config(4), tmp_path / "interrupted")
    monkeypatch.setattr(module, "atomic_torch_save", real_save)
    assert safe_torch_load(tmp_path / "interrupted" / "last.pt")["epoch"] == 2
    with pytest.raises(DfadError, match="--resume"):
        train_teacher(_config(4), tmp_path / "interrupted")
    train_teacher(_config(4), tmp_path / "interrupted", resume=True)

    straight = safe_torch_load(tmp_path / "straight" / "last.pt")["model"]
    resumed = safe_torch_load(tmp_path / "interrupted" / "last.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_without_arch_train_teacher_picks_one_for_the_data_and_says_which(tmp_path):
    from conftest import run_cli

    result = run_cli("train-teacher", "--data", "digits", "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "--arch not given: training digits_cnn" in result.output
    assert load_checkpoint(tmp_path / "run" / "teacher.pt").arch == "digits_cnn"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["arch"] == "digits_cnn"


@pytest.mark.parametrize("data,image_size,expected", [
    ("cifar10", (32, 32), "resnet56"), ("cifar100", (32, 32), "resnet34_8x"), ("folder", (8, 8), "digits_cnn"),
    ("folder", (28, 28), "resnet56"), ("folder", (375, 500), "torchvision.resnet18")])
def test_the_default_teacher_suits_the_data_set_or_its_image_size(data, image_size, expected):
    from dfad_edge.train_teacher import default_teacher_arch

    assert default_teacher_arch(data, image_size)[0] == expected
