import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfad_edge.checkpoint import load_checkpoint, safe_torch_load
from dfad_edge.distill import DistillRun, RunInterrupted, preset_config
from dfad_edge.distill.diagnostics import collapse_warning, mean_pairwise_distance, normalised_entropy
from dfad_edge.distill.losses import class_balance_loss
from dfad_edge.errors import DfadError
from dfad_edge.evaluate import evaluate_checkpoint


def _tiny(**overrides):
    """The digits preset cut to a few seconds, for behaviour (not accuracy) tests."""
    settings = dict(epochs=3, iters_per_epoch=3, batch_size=32, replay_size=256, diagnostic_images=64,
                    sample_images=16, device="cpu")
    settings.update(overrides)
    return preset_config("digits", **settings)


def test_published_recipe_is_the_default():
    config = preset_config("cifar100")
    assert (config.student_arch, config.nz, config.batch_size, config.student_steps) == ("resnet18_8x", 256, 256, 5)
    assert (config.iters_per_epoch, config.epochs, config.lr_student, config.lr_generator) == (50, 500, 0.1, 1e-3)
    assert (config.scheduler, config.milestones, config.gamma, config.loss.student) == ("multistep", (100, 200), 0.1, "l1")
    assert config.loss.bn_stats == 0 and config.loss.class_balance == 0 and config.replay_size == 0
    with pytest.raises(DfadError, match="unknown preset"):
        preset_config("imagenet")


def test_distilled_student_keeps_95_percent_of_the_teacher(distilled_digits, digits_teacher):
    teacher = evaluate_checkpoint(digits_teacher, "digits", torch.device("cpu"))["accuracy"]["100%"]
    student = evaluate_checkpoint(distilled_digits / "student.pt", "digits", torch.device("cpu"))["accuracy"]["100%"]
    assert student >= 0.95 * teacher, (student, teacher)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_other_seeds_also_keep_95_percent(tmp_path, digits_teacher, seed):
    result = DistillRun(preset_config("digits", seed=seed, device="cpu"), digits_teacher, tmp_path / "run",
                        eval_data="digits").run()
    assert result["best"]["accuracy"]["100%"] >= 0.95 * result["teacher_accuracy"]["100%"]


def test_run_folder_holds_what_a_user_reads(distilled_digits):
    config = json.loads((distilled_digits / "config.json").read_text())
    assert config["preset"] == "digits" and config["loss"]["student"] == "l1" and "teacher" in config
    metrics = [json.loads(line) for line in (distilled_digits / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 13))
    for key in ("loss_student", "loss_generator", "lr_student", "lr_generator", "images_per_s", "accuracy", "collapse"):
        assert key in metrics[-1]
    assert {"class_entropy", "classes_predicted", "image_diversity"} <= set(metrics[-1]["collapse"])
    student = load_checkpoint(distilled_digits / "student.pt")
    assert student.provenance["command"] == "distill" and student.arch == "digits_cnn_small"
    assert (distilled_digits / "samples" / "epoch_0012.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert safe_torch_load(distilled_digits / "generator.pt")["format"] == "dfad-edge-generator/1"


def test_healthy_generator_is_not_collapsed(distilled_digits):
    last = json.loads((distilled_digits / "metrics.jsonl").read_text().splitlines()[-1])["collapse"]
    assert last["classes_predicted"] == 10 and last["class_entropy"] > 0.9 and last["image_diversity"] > 0.5


def test_collapse_diagnostics_tell_collapse_from_health():
    assert normalised_entropy(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([20.0, 0.0, 0.0, 0.0])) == pytest.approx(0.0)
    same = torch.randn(1, 3, 8, 8).repeat(16, 1, 1, 1)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-3)
    assert mean_pairwise_distance(torch.randn(16, 3, 8, 8)) == pytest.approx(2**0.5, rel=0.1)
    collapsed = {"class_entropy": 0.1, "classes_predicted": 2, "image_diversity": 0.05}
    assert "mode collapse" in collapse_warning(collapsed, 10)
    assert collapse_warning({"class_entropy": 0.95, "classes_predicted": 10, "image_diversity": 1.2}, 10) is None
    one_class = torch.tensor([[10.0, 0, 0]] * 8)
    assert class_balance_loss(one_class) > class_balance_loss(torch.randn(8, 3) * 0.01)


def test_teacher_stays_frozen_in_eval_mode_and_the_generator_learns(tmp_path, digits_teacher):
    run = DistillRun(_tiny(), digits_teacher, tmp_path / "run")
    teacher_state = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    generator_before = {k: v.clone() for k, v in run.generator.named_parameters()}
    for _ in range(2):
        run.iteration()
    assert not run.teacher.training
    assert all(torch.equal(teacher_state[k], v) for k, v in run.teacher.state_dict().items())
    assert any(not torch.equal(generator_before[k], v) for k, v in run.generator.named_parameters())


def test_teacher_with_another_input_size_sees_a_resized_view(tmp_path, digits_teacher):
    teacher = load_checkpoint(digits_teacher)
    teacher.input_spec.height = teacher.input_spec.width = 16
    teacher.save(tmp_path / "teacher16.pt")
    run = DistillRun(_tiny(), tmp_path / "teacher16.pt", tmp_path / "run")
    seen = []
    run.teacher.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[-2:])))
    run.iteration()
    assert set(seen) == {(16, 16)}
    assert (run.student_spec.height, run.generator_kwargs["img_size"]) == (8, 8)


def test_lr_schedule_steps_per_epoch_not_per_iteration(tmp_path, digits_teacher):
    run = DistillRun(_tiny(epochs=2, milestones=(2,)), digits_teacher, tmp_path / "run")
    run.run()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 3 iterations per epoch: stepped per iteration, the LR would already have dropped during epoch 1.
    assert metrics[0]["lr_student"] == pytest.approx(0.05) and metrics[1]["lr_student"] == pytest.approx(0.005)


def test_resume_after_sigterm_reaches_the_same_student(tmp_path, digits_teacher, monkeypatch):
    DistillRun(_tiny(), digits_teacher, tmp_path / "straight").run()

    interrupted = DistillRun(_tiny(), digits_teacher, tmp_path / "interrupted")
    calls = []
    real_iteration = interrupted.iteration

    def iteration_then_sigterm():
        terms = real_iteration()
        calls.append(1)
        if len(calls) == 5:  # mid-epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    monkeypatch.setattr(interrupted, "iteration", iteration_then_sigterm)
    with pytest.raises(RunInterrupted, match="--resume"):
        interrupted.run()
    state = safe_torch_load(tmp_path / "interrupted" / "last.pt")
    assert (state["epoch"], state["iteration"]) == (1, 2)

    DistillRun(_tiny(), digits_teacher, tmp_path / "interrupted", resume=True).run()
    straight = load_checkpoint(tmp_path / "straight" / "student.pt").state_dict
    resumed = load_checkpoint(tmp_path / "interrupted" / "student.pt").state_dict
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_kill_9_loses_at_most_the_work_since_the_last_checkpoint(tmp_path, digits_teacher):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dfad_edge", "distill", "--teacher", str(digits_teacher), "--out", str(out),
               "--preset", "digits", "--epochs", "40", "--iters-per-epoch", "5", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    saved_epoch = safe_torch_load(out / "last.pt")["epoch"]
    assert 1 <= saved_epoch < 40
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41))


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, digits_teacher, monkeypatch):
    run = DistillRun(_tiny(), digits_teacher, tmp_path / "run")
    real_step, calls = run.student_step, []

    def nan_in_epoch_2():
        calls.append(1)
        return float("nan") if len(calls) > 3 * 5 else real_step()

    monkeypatch.setattr(run, "student_step", nan_in_epoch_2)
    with pytest.raises(DfadError, match="non-finite loss at epoch 2"):
        run.run()
    assert safe_torch_load(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_an_existing_run_is_not_overwritten(tmp_path, digits_teacher):
    DistillRun(_tiny(epochs=1), digits_teacher, tmp_path / "run").run()
    with pytest.raises(DfadError, match="--resume"):
        DistillRun(_tiny(epochs=1), digits_teacher, tmp_path / "run")
