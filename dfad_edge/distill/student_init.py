"""Start the student from the teacher's own layers where the student is a shallower network of the teacher's family.

A ResNet-20 has the layers of a ResNet-56 with fewer blocks in each stage (3 of 9), a ResNet-18 those of a ResNet-34
(2 of 3, 4, 6, 3). DistilBERT (Sanh et al. 2019) starts its student from every other layer of its teacher; here each
stage's blocks are taken evenly spaced, the first (which changes width and resolution) and the last included, and
every layer outside the stages (stem, classifier) is copied as it is. The copy needs only the teacher's weights, so it
is as data-free as the rest of the run. The teacher's BatchNorm running averages are copied with the weights: they no
longer fit a network with blocks removed, but training normalises with batch statistics, and at PyTorch's default
momentum (0.1) the averages follow them within tens of steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DfadError

STUDENT_INITS = ("auto", "teacher", "random")


def spaced_blocks(teacher_blocks: int, student_blocks: int) -> list[int]:
    """Which of a stage's teacher blocks the student's blocks copy: evenly spaced, first and last included (halves
    round up)."""
    if student_blocks == 1:
        return [0]
    return [math.floor(index * (teacher_blocks - 1) / (student_blocks - 1) + 0.5) for index in range(student_blocks)]


def block_stages(model: nn.Module) -> dict[str, int]:
    """Containers of blocks of one kind (a ResNet's layer1, an EfficientNet's features.2) by name, with their length.
    Found in the module tree, not from key names: a container of mixed layers (VGG's features, a stem) is no stage,
    and in nested stages (timm's stages.2.blocks) only the inner one holds the blocks."""
    return {name: len(module) for name, module in model.named_modules()
            if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 0
            and len({type(child) for child in module}) == 1}


def _teacher_key(key: str, student_stages: dict[str, int], teacher_stages: dict[str, int],
                 picked: dict[str, list[int]]) -> tuple[str, str | None]:
    """The teacher's key for a student's, each stage index mapped to its evenly spaced teacher block (``picked``
    records the stages whose blocks were thinned), or why there is none."""
    student_path, teacher_path = [], []
    for part in key.split("."):
        student_name, teacher_name = ".".join(student_path), ".".join(teacher_path)
        if part.isdigit() and student_name in student_stages:
            have, need = teacher_stages.get(teacher_name, 0), student_stages[student_name]
            if have < need:
                return "", f"the teacher's {teacher_name or 'model'} has {have} blocks, the student's {need}"
            blocks = spaced_blocks(have, need)
            if have > need:
                picked[student_name] = blocks
            part_in_teacher = str(blocks[int(part)])
        else:
            part_in_teacher = part
        student_path.append(part)
        teacher_path.append(part_in_teacher)
    return ".".join(teacher_path), None


def teacher_key_map(student: nn.Module, teacher: nn.Module) -> tuple[dict[str, str], dict[str, list[int]], str | None]:
    """Each student key's teacher key and the blocks picked per thinned stage, or why the student is not a shallower
    copy of the teacher."""
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    student_stages, teacher_stages = block_stages(student), block_stages(teacher)
    mapping, picked = {}, {}
    for key, value in student_state.items():
        teacher_key, reason = _teacher_key(key, student_stages, teacher_stages, picked)
        if reason is None and teacher_key not in teacher_state:
            reason = f"the teacher has no {teacher_key} for the student's {key}"
        elif reason is None and teacher_state[teacher_key].shape != value.shape:
            reason = (f"the student's {key} is {tuple(value.shape)}, the teacher's {teacher_key} "
                      f"{tuple(teacher_state[teacher_key].shape)}")
        if reason is not None:
            return {}, {}, reason
        mapping[key] = teacher_key
    if not picked:  # the same network: a copy of the teacher would be no distillation
        return {}, {}, "the student is as deep as the teacher"
    return mapping, picked, None


def initialise_from_teacher(student: nn.Module, teacher: nn.Module, mode: str) -> dict:
    """Copy the teacher's layers into the student where it is a shallower copy (``mode`` auto or teacher; teacher
    refuses a student that is not). Returns the record for config.json."""
    if mode == "random":
        return {"from": "random"}
    mapping, picked, reason = teacher_key_map(student, teacher)
    if reason is not None:
        if mode == "teacher":
            raise DfadError(f"student_init=teacher: the student is not a shallower copy of the teacher ({reason}); "
                            "choose a student of the teacher's family with fewer blocks (e.g. resnet20 for resnet56) "
                            "or student_init=auto")
        return {"from": "random", "why": reason}
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    with torch.no_grad():
        for key, teacher_key in mapping.items():
            student_state[key].copy_(teacher_state[teacher_key])
    return {"from": "teacher", "blocks": picked}
