"""The student started from the teacher's layers (student_init): which blocks, what is copied, where it is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torchvision

from conftest import distill_config
from dfad_edge.checkpoint import InputSpec, model_checkpoint
from dfad_edge.distill import DistillConfig, DistillRun
from dfad_edge.distill.student_init import initialise_from_teacher, spaced_blocks
from dfad_edge.errors import DfadError
from dfad_edge.models import create_model


def test_blocks_are_evenly_spaced_with_the_first_and_last():
    assert spaced_blocks(9, 3) == [0, 4, 8]
    assert spaced_blocks(3, 2) == [0, 2]
    assert spaced_blocks(6, 2) == [0, 5]
    assert spaced_blocks(6, 3) == [0, 3, 5]  # a half rounds up, always (not to the even neighbour)
    assert spaced_blocks(4, 4) == [0, 1, 2, 3]
    assert spaced_blocks(5, 1) == [0]


def _random_resnet(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10)
    for module in model.modules():  # running statistics too must come from the teacher
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_resnet20_takes_blocks_0_4_8_of_each_resnet56_stage_with_stem_head_and_statistics():
    teacher, student = _random_resnet("resnet56", 0), _random_resnet("resnet20", 1)
    record = initialise_from_teacher(student, teacher, "auto")
    assert record == {"from": "teacher", "blocks": {f"layer{i}": [0, 4, 8] for i in (1, 2, 3)}}
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for stage in ("layer1", "layer2", "layer3"):
        for block, picked in enumerate((0, 4, 8)):
            for name in ("conv1.weight", "bn2.weight", "bn2.running_var"):
                assert torch.equal(student_state[f"{stage}.{block}.{name}"], teacher_state[f"{stage}.{picked}.{name}"])
    for key in student_state:
        if not key.startswith("layer"):
            assert torch.equal(student_state[key], teacher_state[key]), key
    # The copy reached the student's own parameters (not a detached copy of its state).
    assert torch.equal(student.layer3[2].conv2.weight, teacher.layer3[8].conv2.weight)


def test_torchvision_resnet18_from_resnet34():
    torch.manual_seed(0)
    teacher, student = torchvision.models.resnet34(num_classes=10), torchvision.models.resnet18(num_classes=10)
    record = initialise_from_teacher(student, teacher, "auto")
    assert record["blocks"] == {"layer1": [0, 2], "layer2": [0, 3], "layer3": [0, 5], "layer4": [0, 2]}
    assert torch.equal(student.layer3[1].conv1.weight, teacher.layer3[5].conv1.weight)
    assert torch.equal(student.layer2[0].downsample[0].weight, teacher.layer2[0].downsample[0].weight)


def test_a_student_of_another_family_stays_random_under_auto_and_is_refused_under_teacher():
    teacher = torchvision.models.resnet50(num_classes=10)  # bottleneck blocks: no layer of a ResNet-18 fits
    torch.manual_seed(3)
    student = torchvision.models.resnet18(num_classes=10)
    before = {key: value.clone() for key, value in student.state_dict().items()}
    record = initialise_from_teacher(student, teacher, "auto")
    assert record["from"] == "random" and "layer1.0.conv1.weight" in record["why"]
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())
    with pytest.raises(DfadError, match="not a shallower copy of the teacher"):
        initialise_from_teacher(student, teacher, "teacher")
    # A deeper student than its teacher is no copy either.
    assert initialise_from_teacher(create_model("resnet56", num_classes=10), create_model("resnet20", num_classes=10),
                                   "auto")["why"] == "the teacher's layer1 has 3 blocks, the student's 9"


def test_stages_are_found_in_the_module_tree_so_nested_stages_are_spaced_per_stage():
    # torchvision's EfficientNet holds its stages in one Sequential of stages (features.N.M): B1 has B0's widths and
    # more blocks per stage, so B0 takes evenly spaced blocks of each stage, not the first ones.
    torch.manual_seed(0)
    teacher, student = torchvision.models.efficientnet_b1(), torchvision.models.efficientnet_b0()
    record = initialise_from_teacher(student, teacher, "auto")
    assert record["blocks"]["features.4"] == [0, 2, 3] and "features" not in record["blocks"]
    assert torch.equal(student.features[4][1].block[0][0].weight, teacher.features[4][2].block[0][0].weight)
    assert torch.equal(student.features[0][0].weight, teacher.features[0][0].weight)


def test_a_student_as_deep_as_its_teacher_is_not_a_copy_of_it():
    teacher, student = _random_resnet("resnet20", 0), _random_resnet("resnet20", 1)
    before = student.layer1[0].conv1.weight.clone()
    assert initialise_from_teacher(student, teacher, "auto") == {"from": "random",
                                                                 "why": "the student is as deep as the teacher"}
    assert torch.equal(student.layer1[0].conv1.weight, before)
    with pytest.raises(DfadError, match="as deep as the teacher"):
        initialise_from_teacher(student, teacher, "teacher")


def test_random_leaves_a_fitting_student_as_it_was():
    teacher, student = _random_resnet("resnet56", 0), _random_resnet("resnet20", 1)
    before = student.layer1[0].conv1.weight.clone()
    assert initialise_from_teacher(student, teacher, "random") == {"from": "random"}
    assert torch.equal(student.layer1[0].conv1.weight, before)


def test_the_run_starts_its_student_from_the_teacher_and_records_it(tmp_path):
    teacher = _random_resnet("resnet56", 0).eval()
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
    path = tmp_path / "teacher.pt"
    model_checkpoint(teacher, "resnet56", {}, 10, spec, None, "test").save(path)
    config = distill_config("dfad", student_arch="resnet20", epochs=1, iters_per_epoch=1, compile_teacher=False,
                            amp="off", channels_last="off", diagnostic_images=8, sample_images=4,
                            options={"batch_size": 4, "student_steps": 1, "replay_size": 0})
    run = DistillRun(config, path, tmp_path / "run")
    assert torch.equal(run.student.layer2[1].conv1.weight, teacher.layer2[4].conv1.weight)
    run.run()
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["student_init"]["from"] == "teacher"
    assert resolved["student_init"]["blocks"]["layer3"] == [0, 4, 8]
    # Copied layers are fine-tuned: the student's rate is the method's times lr_scale_from_teacher, and said so.
    rate = config.options.lr_student * config.lr_scale_from_teacher
    assert config.lr_scale_from_teacher < 1 and resolved["student_init"]["lr_student"] == pytest.approx(rate)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["lr_student"] == pytest.approx(rate)
    # Its config.json keeps the method's rate: the run repeated from it (--config) is scaled once, not twice.
    again = DistillRun(DistillConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())), path,
                       tmp_path / "again")
    assert again.method.optimizer_s.param_groups[0]["lr"] == pytest.approx(rate)
    random_run = DistillRun(replace(config, student_init="random"), path, tmp_path / "random")
    assert random_run.student_init == {"from": "random"}
    assert random_run.method.options.lr_student == config.options.lr_student
    assert not torch.equal(random_run.student.layer2[1].conv1.weight, teacher.layer2[4].conv1.weight)


def test_configs_from_before_student_init_keep_their_random_student_and_its_rate():
    # A config.json written before the option existed (--config) describes a run whose student started at random.
    old = {key: value for key, value in distill_config("dfad").to_dict().items()
           if key not in ("student_init", "lr_scale_from_teacher")}
    assert DistillConfig.from_dict({**old, "resolved": {}}).student_init == "random"
    assert DistillConfig.from_dict({**old, "resolved": {}}).lr_scale_from_teacher == 1.0
    assert DistillConfig.from_dict(old).student_init == "auto"  # a hand-written config takes the default
