"""The interface every distillation method implements, and the registry the loop finds them in.

The loop (loop.py) owns what every method shares: the teacher and student, the schedule of epochs or a time budget,
checkpoints and exact resume, signals, evaluation, diagnostics and sample grids. A method (one file each: dfad.py,
pool.py) owns how images are synthesised and how the student learns from them, with its options in one dataclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import InputSpec
from ..errors import DfadError
from ..runtime import autocast, grad_scaler
from .losses import BatchNormStatistics

# generator.pt, as every method with a generator writes it: the trained generator, to synthesise more images later.
GENERATOR_FORMAT = "dfad-edge-generator/1"
# A teacher counts as flip-invariant (natural images) when flipping a batch of its training images' stand-ins keeps this
# share of its top-1 predictions; digits and text are not (a mirrored 3 is no 3), and flipping them would teach the
# student wrong labels.
FLIP_AGREEMENT = 0.8


def forced_flip(flip: str) -> bool | None:
    """A method's ``flip`` option as a decision: on and off decide it; auto (None) leaves it to the teacher's
    flip agreement, judged by the method on its own images."""
    return {"on": True, "off": False}.get(flip)


@dataclass
class Setup:
    """What the loop hands a method: frozen teacher, student, device and precision, the spec of the images."""

    teacher: nn.Module
    student: nn.Module
    student_forward: Callable[[torch.Tensor], torch.Tensor]  # the student, compiled when asked
    teacher_forward: Callable[[torch.Tensor], torch.Tensor]  # the teacher with its BatchNorm layers (hooks see them)
    folded_teacher_forward: Callable[[torch.Tensor], torch.Tensor]  # the same function, faster (models/frozen.py)
    # The module behind folded_teacher_forward: hooks on it fire in the compiled forward too if registered before its
    # first call (a compiled graph leaves out hooks added later), as the methods do when they are built.
    folded_teacher: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None  # the student's training and the generator's steps
    # The teacher's folded forwards (the students' targets, and generator steps without the BN-statistics term, whose
    # hooked forwards take amp_dtype); amp=auto times it apart.
    teacher_amp_dtype: torch.dtype | None
    channels_last: bool
    num_classes: int
    student_spec: InputSpec
    teacher_size: tuple[int, int] | None  # the teacher's input size where it differs from the student's
    epochs: int

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def teacher_autocast(self):
        """The teacher's autocast region for its folded forwards; it holds inside the student's region too."""
        return autocast(self.device, self.teacher_amp_dtype, override=True)

    def generator_scaler(self) -> torch.amp.GradScaler:
        """The loss scaler of a generator step, whose gradient flows back through the teacher too: on wherever either
        network computes in fp16, whose small gradients underflow without it."""
        fp16 = torch.float16 in (self.amp_dtype, self.teacher_amp_dtype)
        return grad_scaler(self.device, torch.float16 if fp16 else self.amp_dtype)

    @staticmethod
    @contextmanager
    def frozen(module: nn.Module):
        """Gradients flow through the module to its input but its own weight gradients are not computed (the
        generator's steps need d loss / d image, never the student's weight gradients)."""
        flags = [p.requires_grad for p in module.parameters()]
        module.requires_grad_(False)
        try:
            yield
        finally:
            for parameter, flag in zip(module.parameters(), flags):
                parameter.requires_grad_(flag)

    def to_memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images

    def teacher_logits(self, images: torch.Tensor, original: bool = False) -> torch.Tensor:
        """The teacher on images in the student's spec; resized (differentiably) when the teacher takes another size.
        ``original``: run the teacher itself, in the caller's precision, so hooks on its layers fire (BN-statistics
        matching hooks its BatchNorm layers); every other call runs the folded copy."""
        if self.teacher_size is not None:
            images = F.interpolate(images, size=self.teacher_size, mode="bilinear", align_corners=False)
        if original:
            return self.teacher_forward(images).float()
        if self.teacher_amp_dtype is None:
            images = images.float()  # made in the student's bf16 region, read by a teacher in fp32
        # The folded copy keeps its weights in the teacher's autocast type.
        with self.teacher_autocast():
            return self.folded_teacher_forward(images).float()

    @torch.no_grad()
    def flip_agreement(self, images: torch.Tensor) -> float:
        """The share of images whose teacher top-1 survives a horizontal flip, over every rank's images."""
        from ..distributed import mean_over_ranks

        with self.autocast():
            straight = self.teacher_logits(images).argmax(1)
            mirrored = self.teacher_logits(images.flip(-1)).argmax(1)
        return float(mean_over_ranks((straight == mirrored).float().mean()))

    def teacher_logits_and_bn_loss(self, images: torch.Tensor,
                                   bn_statistics: BatchNormStatistics | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and, where BN-statistics matching is on, its term (from the forward through the
        teacher's BatchNorm layers, which the term hooks); 0 where it is off (the faster folded forward)."""
        if bn_statistics is None:
            return self.teacher_logits(images), torch.zeros((), device=self.device)
        with bn_statistics:
            logits = self.teacher_logits(images, original=True)
        return logits, bn_statistics.loss()


class DistillMethod(ABC):
    """One way of making synthetic images and teaching the student on them."""

    name: ClassVar[str]
    options_class: ClassVar[type]
    # The entries of state_dict() that differ between torchrun ranks (what each rank drew or stored for itself). The
    # rest (generator, optimisers: kept equal by synchronised BatchNorm and averaged gradients) is rank 0's for all, so
    # last.pt holds it once and nothing else crosses the ranks at a checkpoint.
    rank_local_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, setup: Setup, options):
        self.setup, self.options = setup, options

    @property
    def student_batch_size(self) -> int:
        """Images in one of this rank's student steps."""
        return self.options.batch_size

    @abstractmethod
    def iteration(self, progress: float) -> dict[str, torch.Tensor | int]:
        """One unit of work at this point of the run (0..1). Returns its loss terms as 0-dim tensors left on the
        device (the loop reads them back once per log interval, not once per iteration), and under "images" the
        number of images that went through a network, as an int (for images/s)."""

    @abstractmethod
    def learning_rates(self) -> dict[str, float]:
        """The learning rates in effect now, by optimiser, named lr_<part>."""

    @abstractmethod
    def synthetic_batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised synthetic images and the teacher's logits for them, for diagnostics and sample grids; must not
        disturb the training state (RNG included)."""

    def diagnostics(self) -> dict:
        """Method-specific figures for metrics.jsonl (e.g. the pool's class histogram)."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume exactly, except large data kept in its own files (save_files)."""

    @abstractmethod
    def load_state_dict(self, state: dict, out: Path) -> None: ...

    def save_files(self, out: Path) -> None:
        """Write large state incrementally (e.g. the synthetic pool) before last.pt names it."""

    @abstractmethod
    def generator_artifact(self) -> dict | None:
        """What generator.pt holds: the trained generator, for users who want more synthetic images (None: the
        method has no generator, and the run folder no generator.pt)."""

    def provenance(self) -> dict:
        """What the student was taught from, beyond the teacher (e.g. source images with their hashes), for
        config.json and result.json."""
        return {}

    @abstractmethod
    def calibration_images(self, count: int, seed: int) -> torch.Tensor:
        """Normalised synthetic images that represent what the student trained on, for data-free INT8 calibration."""


METHODS: dict[str, type[DistillMethod]] = {}


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        raise DfadError(f"unknown method '{name}': choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def sgd(parameters, lr: float, momentum: float, weight_decay: float, device: torch.device) -> torch.optim.SGD:
    """SGD with the multi-tensor (foreach) update on CUDA: one kernel launch per parameter group, not per tensor."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           foreach=device.type == "cuda")


def student_optimizer(setup: Setup, options) -> tuple[torch.optim.SGD, torch.amp.GradScaler]:
    """The student's SGD (every method's options carry lr_student, momentum and weight_decay) and its loss scaler."""
    optimizer = sgd(setup.student.parameters(), options.lr_student, options.momentum, options.weight_decay, setup.device)
    return optimizer, grad_scaler(setup.device, setup.amp_dtype)


def adam(parameters, lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(parameters, lr=lr, betas=betas, foreach=device.type == "cuda")


def generator_kwargs(setup: Setup, nz: int, ngf: int) -> dict:
    """The generators make square images of the student's input: their size and channels, or a clear refusal."""
    channels, height, width = setup.student_spec.shape
    if height != width:
        raise DfadError(f"the generators make square images; the student input is {height}x{width}")
    return {"nz": nz, "ngf": ngf, "img_size": height, "channels": channels}


def scaled_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One optimiser step on ``loss``, scaled for fp16 (a pass-through scaler otherwise)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
