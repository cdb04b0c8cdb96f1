"""Start the student from the teacher's own layers where the student is a shallower network of the teacher's family.

A ResNet-20 has the layers of a ResNet-56 with fewer blocks in each stage (3 of 9), a ResNet-18 those of a ResNet-34
(2 of 3, 4, 6, 3). DistilBERT (Sanh et al. 2019) starts its student from every other layer of its teacher; here each
stage's blocks are taken evenly spaced, the first (which changes width and resolution) and the last included, and
every layer outside the stages (stem, classifier) is copied as it is. The copy needs only the teacher's weights, so it
is as data-free as the rest of the run. The student's BatchNorm layers normalise with batch statistics in training
and re-learn their running averages within steps, so the teacher's averages are copied with the weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import DfadError

STUDENT_INITS = ("auto", "teacher", "random")
# "layer2.0.conv1.weight": stage "layer2", block 0, the rest inside the block. The first number in a key is taken as
# the block: torchvision's and timm's ResNets and the CIFAR ResNets name their parameters this way.
BLOCK_KEY = re.compile(r"^(?P<stage>.+?)\.(?P<block>\d+)\.(?P<rest>.+)$")


def spaced_blocks(teacher_blocks: int, student_blocks: int) -> list[int]:
    """Which of a stage's teacher blocks the student's blocks copy: evenly spaced, first and last included."""
    if student_blocks == 1:
        return [0]
    return [round(index * (teacher_blocks - 1) / (student_blocks - 1)) for index in range(student_blocks)]


def _blocks_per_stage(state: dict[str, torch.Tensor]) -> dict[str, int]:
    stages: dict[str, set[int]] = {}
    for key in state:
        match = BLOCK_KEY.match(key)
        if match:
            stages.setdefault(match["stage"], set()).add(int(match["block"]))
    return {stage: max(blocks) + 1 for stage, blocks in stages.items()}


def teacher_key_map(student_state: dict[str, torch.Tensor],
                    teacher_state: dict[str, torch.Tensor]) -> tuple[dict[str, str], str | None]:
    """Each student key's teacher key, or why the student is not a shallower copy of the teacher."""
    student_stages, teacher_stages = _blocks_per_stage(student_state), _blocks_per_stage(teacher_state)
    mapping = {}
    for key, value in student_state.items():
        match = BLOCK_KEY.match(key)
        teacher_key = key
        if match:
            stage, block = match["stage"], int(match["block"])
            have = teacher_stages.get(stage, 0)
            if have < student_stages[stage]:
                return {}, f"the teacher's {stage} has {have} blocks, the student's {student_stages[stage]}"
            picked = spaced_blocks(have, student_stages[stage])[block]
            teacher_key = f"{stage}.{picked}.{match['rest']}"
        if teacher_key not in teacher_state:
            return {}, f"the teacher has no {teacher_key} for the student's {key}"
        if teacher_state[teacher_key].shape != value.shape:
            return {}, (f"the student's {key} is {tuple(value.shape)}, the teacher's {teacher_key} "
                        f"{tuple(teacher_state[teacher_key].shape)}")
        mapping[key] = teacher_key
    return mapping, None


def initialise_from_teacher(student: nn.Module, teacher: nn.Module, mode: str) -> dict:
    """Copy the teacher's layers into the student where it is a shallower copy (``mode`` auto or teacher; teacher
    refuses a student that is not). Returns the record for config.json."""
    if mode == "random":
        return {"from": "random"}
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    mapping, reason = teacher_key_map(student_state, teacher_state)
    if reason is not None:
        if mode == "teacher":
            raise DfadError(f"student_init=teacher: the student is not a shallower copy of the teacher ({reason}); "
                            "choose a student of the teacher's family (e.g. resnet20 for resnet56) or student_init=auto")
        return {"from": "random", "why": reason}
    with torch.no_grad():
        for key, teacher_key in mapping.items():
            student_state[key].copy_(teacher_state[teacher_key])
    stages = _blocks_per_stage(student_state)
    teacher_stages = _blocks_per_stage(teacher_state)
    return {"from": "teacher", "blocks": {stage: spaced_blocks(teacher_stages[stage], count)
                                          for stage, count in stages.items()}}
