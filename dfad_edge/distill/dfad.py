"""DFAD (Fang et al. 2019): a generator searches for images where student and teacher disagree; the student learns to
agree on them. Defaults are the published recipe; the remedies against mode collapse (BatchNorm-statistics matching,
class balance, a replay memory) are options, off by default.

One iteration: ``student_steps`` student steps on fresh (detached) generator batches, then one generator step that
maximises the student-teacher discrepancy, its gradient flowing through both networks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.markup import escape

from ..distributed import data_parallel
from ..errors import DfadError
from ..models import create_model
from ..models.frozen import expose_outputs, outputs_agree
from ..options import option
from ..progress import log
from .augment import random_shift_flip
from .losses import (BatchNormStatistics, ClassifierInput, StageOutputs, class_balance_loss, require_batchnorm,
                     stage_match_loss, stage_names, student_logit_loss)
from .method import (FLIP_AGREEMENT, GENERATOR_FORMAT, DistillMethod, Setup, adam, forced_flip, generator_kwargs,
                     register_method, scaled_step, student_optimizer)
from .schedule import SCHEDULES, epoch_progress, lr_factor, set_lr

# The generator's first images are noise, on which the teacher's flip agreement says nothing about its training data;
# this many generator steps (an epoch of the tiny, small and large presets) first shape them for the teacher.
FLIP_DECISION_ITERATIONS = 20
# stage_match=auto: the one weight measured (docs/results.md, "The teacher's stage outputs"), and the most the replay
# memory may spend on the teacher's stage outputs (8,192 images at 32 px: a ResNet-56's 0.47 GB, a ResNet-34_8x's
# 2.0 GB; a wide network at 64 px would need tens of GB, where auto leaves the term off rather than exhaust memory).
STAGE_MATCH_AUTO = 1.0
STAGE_MEMORY_AUTO_GB = 4.0


@dataclass
class DfadOptions:
    nz: int = option(256, "generator latent size", min=1)
    ngf: int = option(64, "generator width", min=1)
    batch_size: int = option(256, "synthetic images per step", min=1, split=True)
    student_steps: int = option(5, "student steps per generator step", min=1)
    generator_batch: int = option(0, "images per generator step (0: batch_size)", min=0, split=True)
    lr_student: float = option(0.1, "student SGD learning rate", above=0)
    momentum: float = option(0.9, "student SGD momentum", min=0, below=1)
    weight_decay: float = option(5e-4, "student SGD weight decay", min=0)
    lr_generator: float = option(1e-3, "generator Adam learning rate", above=0)
    generator_schedule: str = option("scheduled", "the generator's rate: scheduled (as the student's, the paper) or "
                                     "constant", choices=("scheduled", "constant"))
    scheduler: str = option("multistep", "LR schedule of the student and (unless generator_schedule=constant) the "
                            "generator, stepped once per epoch", choices=SCHEDULES)
    milestones: tuple[int, ...] = option((100, 200), "epochs where multistep multiplies the LRs by gamma", min=1)
    step_size: int = option(100, "epochs between drops for scheduler=step", min=1)
    gamma: float = option(0.1, "LR factor at each drop", above=0, max=1)
    student_loss: str = option("l1", "student-teacher discrepancy (paper: l1)", choices=("l1", "kl", "mse"))
    temperature: float = option(1.0, "softening temperature for student_loss=kl", above=0)
    adversarial: float = option(1.0, "weight of the generator's adversarial term", min=0)
    bn_stats: float = option(0.0, "remedy: weight of BatchNorm-statistics matching (DeepInversion), 0 = off", min=0)
    class_balance: float = option(0.0, "remedy: weight of DAFL's class-balance term, 0 = off", min=0)
    replay_size: int = option(0, "remedy: past synthetic images replayed to the student, 0 = off", min=0, split=True)
    replay_fraction: float = option(0.5, "share of each student batch taken from the replay memory", min=0, below=1)
    replay_keep: str = option("recent", "which images the replay memory keeps: recent (a ring of the newest) or "
                              "reservoir (a uniform sample of every image the run has made)",
                              choices=("recent", "reservoir"))
    student_augment: bool = option(False, "shift (and, if the teacher is flip-invariant, mirror) each fresh generator "
                                   "image before the teacher labels it for the student")
    flip: str = option("auto", "mirror in student_augment; auto: only if the teacher's predictions survive a flip on "
                       f"the generator's images after its first {FLIP_DECISION_ITERATIONS} steps (on adversarial "
                       "images even a flip-invariant teacher seldom passes: on forces it)",
                       choices=("auto", "on", "off"))
    feature_match: float = option(0.0, "weight of an L1 term between the student's and the teacher's penultimate "
                                  "features (their classifiers' inputs) on the student's images, 0 = off; compared "
                                  "unit by unit, so meant for a student from the teacher's layers", min=0)
    stage_match: float | str = option(0.0, "weight of an L1 term between the output of each of the student's stages "
                                      "(a ResNet's layer1-3) and the teacher's same stage, relative to the teacher's "
                                      "mean activation there, on the student's images, 0 = off; for a student of the "
                                      f"teacher's stages and widths (from its layers); auto: {STAGE_MATCH_AUTO:g} "
                                      "where the student has them and the replay memory can keep the teacher's stage "
                                      f"outputs in {STAGE_MEMORY_AUTO_GB:g} GB, else off", min=0, words=("auto",))

    def validate(self, epochs: int) -> None:
        # The schedule counts epochs of this run: a drop on or after the last epoch would never happen.
        late = [m for m in self.milestones if m >= epochs]
        if self.scheduler == "multistep" and late:
            raise DfadError(f"milestones {late} fall on or after the last epoch ({epochs} epochs), so those drops never "
                            f"happen: --set milestones=... below {epochs} (e.g. {max(1, epochs // 5)},{max(1, 2 * epochs // 5)}) or "
                            "--set scheduler=cosine")
        if self.scheduler == "step" and self.step_size >= epochs:
            raise DfadError(f"step_size {self.step_size} is not below epochs ({epochs}), so the learning rate never "
                            f"drops: --set step_size=... below {epochs}, or --set scheduler=cosine")
        # A memory smaller than a batch could not hold one write, nor give the replayed share of a student batch
        # (which would then silently shrink every student batch).
        if self.replay_size and self.replay_size < self.batch_size:
            raise DfadError(f"replay_size {self.replay_size} is smaller than batch_size {self.batch_size}: the memory "
                            "must hold one batch. Use replay_size >= batch_size, or 0 to turn replay off.")


class ReplayMemory:
    """Past synthetic images (the newest, or with keep="reservoir" a uniform sample of the whole run) and the
    teacher's logits for them; mixing them into student steps keeps the student from forgetting regions of input
    space the generator has moved away from. The teacher is frozen, so its logits for an image never change: kept,
    they spare a teacher forward for every replayed image (half of each student batch). Images in float16: half the
    memory (8192 images at 224 px: 2.5 GB, not 4.9), and they are standardised (unit variance), far inside its
    range. An image's logits are the teacher's for it before that rounding (a float16 rounding apart, against a
    teacher forward saved); logits stay float32 (8192 x 1000 classes: 33 MB). With feature_match or stage_match, the
    teacher's features too, one row per image, in float16 (penultimate: 8192 x 64, 1 MB; a ResNet-56's stage outputs
    at 32 px: 8192 x 28,672, 470 MB)."""

    def __init__(self, capacity: int, keep: str = "recent"):
        self.capacity, self.keep, self.count = capacity, keep, 0
        self.images = self.logits = self.features = None

    def add(self, images: torch.Tensor, logits: torch.Tensor, features: torch.Tensor | None = None) -> None:
        if self.capacity <= 0:
            return
        if self.images is None:
            self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=torch.float16, device=images.device)
            self.logits = torch.empty((self.capacity, logits.shape[1]), dtype=torch.float32, device=images.device)
        if features is not None and self.features is None:
            self.features = torch.empty((self.capacity, features.shape[1]), dtype=torch.float16, device=images.device)
        rows, positions = self._slots_for(len(images), images.device)
        self.images[positions] = images.detach()[rows].to(torch.float16)
        self.logits[positions] = logits.detach()[rows].float()
        if features is not None:
            self.features[positions] = features.detach()[rows].to(self.features.dtype)
        self.count += len(images)

    def _slots_for(self, size: int, device: torch.device) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """Which of ``size`` new images are written, and where. Recent: all, over the oldest. Reservoir (Vitter's
        algorithm R): the n-th image of the run replaces a random slot with probability capacity / n, so the memory
        stays a uniform sample of the whole run, not of its last minute."""
        run_index = torch.arange(size, device=device) + self.count
        if self.keep == "recent":
            return slice(None), run_index % self.capacity
        # float64: float32's 24 bits would leave some slots undrawable after 16.8 M images (a long GPU run's count).
        draws = torch.rand(size, dtype=torch.float64, device=device) * (run_index + 1)
        slots = torch.where(run_index < self.capacity, run_index, draws.long())
        kept = (slots < self.capacity).nonzero().flatten()
        # Two new images drawn to one slot: the later one wins, as if written one after the other.
        last = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        last.scatter_reduce_(0, slots[kept], kept, reduce="amax")
        rows = last[last >= 0]
        return rows, slots[rows]

    def sample(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``size`` stored images (as float32), their teacher logits and (if kept) features, drawn with replacement."""
        filled = min(self.count, self.capacity)
        if self.images is None or filled < size:
            return None
        picked = torch.randint(0, filled, (size,), device=self.images.device)
        features = self.features[picked].float() if self.features is not None else None
        return self.images[picked].float(), self.logits[picked], features

    def state(self) -> dict:
        return {"images": self.images, "logits": self.logits, "features": self.features, "count": self.count}

    def load(self, state: dict, device: torch.device,
             teacher_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = state["images"].to(device) if state["images"] is not None else None
        self.count = state["count"]
        # A run resumes with its saved options and stage_match's saved decision (DfadMethod.load_state_dict), so a
        # memory without features is one of a run without feature_match and stage_match. One from before features
        # were float16 stays float32 (new rows are cast to it).
        self.features = state.get("features")
        if self.features is not None:
            self.features = self.features.to(device)
        self.logits = state.get("logits")
        if self.logits is not None:
            self.logits = self.logits.to(device)
        elif self.images is not None:
            # A last.pt from before the memory kept logits: the frozen teacher gives the same ones again, for the rows
            # filled so far (the others are written before they can be drawn).
            filled = min(self.count, self.capacity)
            with torch.no_grad():
                kept = torch.cat([teacher_logits(self.images[i:min(i + 256, filled)].float())
                                  for i in range(0, filled, 256)])
            self.logits = torch.zeros((self.capacity, kept.shape[1]), device=device)
            self.logits[:filled] = kept


class AdversarialGenerator:
    """DFAD's generator and its step: images where the student departs from the teacher (the adversarial term, its
    gradient flowing through both networks), kept near the teacher's data by the remedies' terms (BN statistics, class
    balance). The dfad method trains the student on its images alone; the image prior can mix them in."""

    def __init__(self, setup: Setup, nz: int, ngf: int, lr: float, student_loss, adversarial: float, bn_stats: float,
                 class_balance: float, batch_size: int):
        self.setup, self.nz, self.batch_size = setup, nz, batch_size
        self.weights = {"adversarial": adversarial, "bn_stats": bn_stats, "class_balance": class_balance}
        self.kwargs = generator_kwargs(setup, nz, ngf)
        self.generator = create_model("generator_a", **self.kwargs).to(setup.device)
        if setup.channels_last:
            self.generator.to(memory_format=torch.channels_last)
        self.forward = data_parallel(self.generator, setup.device)
        if bn_stats > 0:
            require_batchnorm(setup.teacher, "bn_stats")
        self.bn_statistics = BatchNormStatistics(setup.teacher) if bn_stats > 0 else None
        self.student_loss = student_loss
        self.optimizer = adam(self.generator.parameters(), lr, (0.9, 0.999), setup.device)
        self.scaler = setup.generator_scaler()

    def synthesize(self, batch_size: int) -> torch.Tensor:
        z = torch.randn(batch_size, self.nz, device=self.setup.device)
        return self.setup.to_memory_format(self.forward(z))

    def step(self) -> dict[str, torch.Tensor]:
        setup, weights = self.setup, self.weights
        self.generator.train()
        zero = torch.zeros((), device=setup.device)
        with setup.autocast(), setup.frozen(setup.student):
            images = self.synthesize(self.batch_size)
            teacher_logits, bn_loss = setup.teacher_logits_and_bn_loss(images, self.bn_statistics)
            # The generator maximises the student-teacher discrepancy; the gradient flows through both networks.
            adversarial = -self.student_loss(setup.student_forward(images).float(), teacher_logits)
            balance = class_balance_loss(teacher_logits) if weights["class_balance"] > 0 else zero
            loss = (weights["adversarial"] * adversarial + weights["bn_stats"] * bn_loss
                    + weights["class_balance"] * balance)
        scaled_step(loss, self.optimizer, self.scaler)
        return {"loss_generator": loss.detach(), "loss_adversarial": adversarial.detach(),
                "loss_bn_stats": bn_loss.detach(), "loss_class_balance": balance.detach()}

    @torch.no_grad()
    def generate(self, count: int, seed: int, with_teacher: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """From a copy of the generator (batch statistics, as in training) for fixed latents, so figures are comparable
        across epochs and sampling disturbs neither the generator nor the RNG."""
        generator = copy.deepcopy(self.generator).train()
        latent_rng = torch.Generator(device="cpu").manual_seed(seed)
        images, logits = [], []
        for start in range(0, count, self.batch_size):
            size = min(self.batch_size, count - start)
            z = torch.randn(size, self.nz, generator=latent_rng).to(self.setup.device)
            with self.setup.autocast():
                batch = generator(z).float()
                if with_teacher:
                    logits.append(self.setup.teacher_logits(batch))
            images.append(batch)
        return torch.cat(images), (torch.cat(logits) if with_teacher else None)

    def artifact(self) -> dict:
        return {"format": GENERATOR_FORMAT, "arch": "generator_a", "arch_kwargs": self.kwargs,
                "state_dict": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()}, "output": "normalised"}

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer_g": self.optimizer.state_dict(),
                "scaler_g": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer_g"])
        self.scaler.load_state_dict(state["scaler_g"])


@register_method
class DfadMethod(DistillMethod):
    name = "dfad"
    options_class = DfadOptions
    rank_local_state = ("replay",)

    def __init__(self, setup: Setup, options: DfadOptions):
        super().__init__(setup, options)
        self.student_loss = student_logit_loss(options.student_loss, options.temperature)
        self.adversary = AdversarialGenerator(setup, options.nz, options.ngf, options.lr_generator, self.student_loss,
                                              options.adversarial, options.bn_stats, options.class_balance,
                                              options.generator_batch or options.batch_size)
        self.generator = self.adversary.generator
        self.optimizer_s, self.scaler_s = student_optimizer(setup, options)
        self.replay = ReplayMemory(options.replay_size, options.replay_keep)
        self.generator_steps = 0
        self.flip_allowed: bool | None = forced_flip(options.flip)
        self.flip_agreement: float | None = None
        self.stage_record: dict = {}
        self.student_stages, self.teacher_stages = self._stage_taps() if options.stage_match != 0 else (None, None)
        self.stage_weight = 0.0 if self.teacher_stages is None else (
            STAGE_MATCH_AUTO if options.stage_match == "auto" else options.stage_match)
        self.student_features, self.teacher_features = self._feature_taps() if options.feature_match > 0 else (None, None)

    def _feature_taps(self) -> tuple[ClassifierInput, ClassifierInput]:
        """The student's and the teacher's penultimate features, kept at each forward (the teacher's inference copy,
        which labels the student's images)."""
        setup = self.setup
        student = ClassifierInput(setup.student, setup.num_classes, "student", "feature_match")
        teacher = ClassifierInput(setup.folded_teacher, setup.num_classes, "teacher", "feature_match")
        if student.width != teacher.width:
            raise DfadError(f"feature_match compares penultimate features, but the student has {student.width} and the "
                            f"teacher {teacher.width}: pick a student of the teacher's width or --set feature_match=0")
        return student, teacher

    def _stage_taps(self) -> tuple[StageOutputs | None, StageOutputs | None]:
        """The outputs of the student's and the teacher's stages, kept at each forward (the teacher's from its
        inference copy, which labels the student's images). Their names and shapes must match (a student from the
        teacher's layers, at the teacher's input size), checked here on one example, before the replay memory is sized
        for them. Where they do not, a weight refuses to start; auto leaves the term off, as it does where the replay
        memory could not keep the teacher's outputs."""
        setup, auto = self.setup, self.options.stage_match == "auto"
        names = {"student": stage_names(setup.student), "teacher": stage_names(setup.teacher)}
        problem, taps = self._stage_names_problem(names), (None, None)
        exposed = expose_outputs(setup.folded_teacher, names["teacher"]) if problem is None else None
        if problem is None and exposed is None:
            problem = "reads each stage's output, but the teacher's traced copy does not show them all", None
        if problem is None:
            taps = (StageOutputs(setup.student, names["student"], "student", "stage_match"),
                    StageOutputs(setup.folded_teacher, names["teacher"], "teacher", "stage_match", exposed))
            problem, values_per_image = self._stage_shapes_problem(*taps)
            if problem is None and auto:
                problem = self._stage_memory_problem(values_per_image)
        if problem is None:
            self.stage_record = {"stages": names["teacher"]}
            if auto:
                log(f"stage_match=auto: weight {STAGE_MATCH_AUTO:g} on the outputs of {', '.join(names['teacher'])}")
            return taps
        for stage_outputs in taps:
            if stage_outputs is not None:
                stage_outputs.remove()
        reason, advice = problem
        if not auto:
            raise DfadError(f"stage_match {reason}: {advice + ' or ' if advice else ''}--set stage_match=0")
        self.stage_record = {"off_because": f"the term {reason}" + (f" (to turn it on: {advice})" if advice else "")}
        log(escape(f"stage_match=auto: off, as {self.stage_record['off_because']}"))
        return None, None

    # The problems below: why the term cannot be computed, and what would let it (None: nothing but leaving it off).
    @staticmethod
    def _stage_names_problem(names: dict[str, list[str]]) -> tuple[str, str | None] | None:
        for role, found in names.items():
            if not found:
                return f"compares stages of blocks (as a ResNet's layer1-3), but the {role} has no stages of blocks", None
        if names["student"] != names["teacher"]:
            return (f"compares stages of the same names, but the student has {names['student']} and the teacher "
                    f"{names['teacher']}"), "pick a student of the teacher's family"
        return None

    def _stage_shapes_problem(self, student: StageOutputs,
                              teacher: StageOutputs) -> tuple[tuple[str, str | None] | None, int]:
        """Why the stage outputs cannot be compared unit by unit, if they cannot, and the teacher's values per image.
        The inference copy's outputs are checked against the original teacher's stages on the same example."""
        setup = self.setup
        # Its own generator: the check must not move the run's random stream.
        example = torch.randn(2, *setup.student_spec.shape, generator=torch.Generator().manual_seed(0))
        example = example.to(setup.device)
        resized = F.interpolate(example, size=setup.teacher_size) if setup.teacher_size else example
        original = StageOutputs(setup.teacher, teacher.names, "teacher", "stage_match")
        training = setup.student.training
        setup.student.eval()  # no batch statistics of this example in the student's running averages
        try:
            with torch.no_grad():
                setup.student(example)
                setup.teacher(resized)
                with setup.teacher_autocast():
                    setup.folded_teacher(resized)
        finally:
            setup.student.train(training)
        expected = original.outputs()
        original.remove()
        values = 0
        for name, ours, theirs, truth in zip(student.names, student.outputs(), teacher.outputs(), expected):
            if ours.shape[1:] != theirs.shape[1:]:
                advice = ("the teacher's input size for the student (no --set student_input_size)"
                          if ours.shape[1] == theirs.shape[1] else "a student of the teacher's widths")
                return (f"compares stage outputs unit by unit, but the student's {name} gives {tuple(ours.shape[1:])} "
                        f"and the teacher's {tuple(theirs.shape[1:])}", advice), 0
            # Within 5% of the stage's largest output (the copy may compute in bf16), however small its outputs.
            if theirs.shape != truth.shape or not outputs_agree(truth, theirs, relative=0.05, floor=1e-6):
                return (f"reads the teacher's {name} output from its traced copy, which there differs from the "
                        "teacher's", None), 0
            values += theirs[0].numel()
        return None, values

    def _stage_memory_problem(self, values_per_image: int) -> tuple[str, str | None] | None:
        gigabytes = values_per_image * 2 * self.options.replay_size / 1e9  # float16 rows
        if gigabytes <= STAGE_MEMORY_AUTO_GB:
            return None
        return (f"would keep {gigabytes:.3g} GB of the teacher's stage outputs in the replay memory "
                f"({self.options.replay_size} images in each process), over auto's {STAGE_MEMORY_AUTO_GB:g} GB"), \
            "a smaller replay_size, or a weight (stage_match=1) to keep them all"

    def _set_learning_rates(self, progress: float) -> None:
        options = self.options
        factor = lr_factor(options.scheduler, epoch_progress(progress, self.setup.epochs), self.setup.epochs,
                           options.milestones, options.step_size, options.gamma)
        set_lr(self.optimizer_s, options.lr_student * factor)
        # Constant, the generator keeps moving to new images until the end while the student's rate runs down (our
        # reading of why it led at 30 minutes: a decayed generator all but stops, so the last epochs replay a narrow
        # set of images; docs/results.md, "Other images, other generators").
        generator_factor = factor if options.generator_schedule == "scheduled" else 1.0
        set_lr(self.adversary.optimizer, options.lr_generator * generator_factor)

    def learning_rates(self) -> dict[str, float]:
        return {"lr_student": self.optimizer_s.param_groups[0]["lr"],
                "lr_generator": self.adversary.optimizer.param_groups[0]["lr"]}

    def student_step(self) -> torch.Tensor:
        options, setup = self.options, self.setup
        replay_count = int(options.batch_size * options.replay_fraction) if options.replay_size else 0
        fresh_count = options.batch_size - replay_count if self.replay.count >= replay_count > 0 else options.batch_size
        with torch.no_grad(), setup.autocast():
            fresh = self.adversary.synthesize(fresh_count).float()
            if options.student_augment:
                # The teacher labels the view the student sees, so the pair is consistent; mirroring is still gated,
                # as mirrored views of, say, digits are far from the teacher's data. Until decided, shifts only.
                fresh = setup.to_memory_format(random_shift_flip(fresh, flip=bool(self.flip_allowed)))
            fresh_logits, fresh_features = self._teacher_targets_of(fresh)
        replayed = self.replay.sample(replay_count) if replay_count and fresh_count < options.batch_size else None
        self.replay.add(fresh, fresh_logits, fresh_features)
        images, teacher_logits, teacher_features = fresh, fresh_logits, fresh_features
        if replayed is not None:
            images, teacher_logits, teacher_features = [
                torch.cat(parts) if parts[0] is not None else None
                for parts in zip((fresh, fresh_logits, fresh_features), replayed)]
        with setup.autocast():
            loss = self.student_loss(setup.student_forward(images).float(), teacher_logits)
            if teacher_features is not None:
                loss = loss + self._feature_terms(teacher_features)
        scaled_step(loss, self.optimizer_s, self.scaler_s)
        return loss.detach()

    def _feature_terms(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """feature_match's and stage_match's terms for the student's latest forward. Features say more per image than
        logits do (64 numbers against 10 at CIFAR scale; a ResNet's stage outputs 28,672). ``teacher_features``: one
        row per image, the penultimate features first, then the stage outputs (as _teacher_targets_of gives them)."""
        options, terms = self.options, []
        if self.student_features is not None:
            width = self.student_features.width
            terms.append(options.feature_match * F.l1_loss(self.student_features.latest.float(),
                                                           teacher_features[:, :width]))
            teacher_features = teacher_features[:, width:]
        if self.student_stages is not None:
            terms.append(self.stage_weight * stage_match_loss(self.student_stages.outputs(), teacher_features))
        return torch.stack(terms).sum()

    def iteration(self, progress: float) -> dict[str, torch.Tensor]:
        self._set_learning_rates(progress)
        undecided = self.options.student_augment and self.flip_allowed is None
        if undecided and self.generator_steps >= FLIP_DECISION_ITERATIONS:
            self._decide_flip()
        self.setup.student.train()
        self.generator.train()
        student_losses = [self.student_step() for _ in range(self.options.student_steps)]
        terms = self.adversary.step()
        self.generator_steps += 1
        terms["loss_student"] = torch.stack(student_losses).mean()
        terms["images"] = self.options.student_steps * self.options.batch_size + self.adversary.batch_size
        return terms

    def _decide_flip(self) -> None:
        """Mirror fresh images only if the teacher is (nearly) flip-invariant on the generator's images (a fixed
        latent batch from a copy of the generator: the run's random stream is untouched)."""
        images = self.adversary.generate(512, seed=0, with_teacher=False)[0]
        self.flip_agreement = self.setup.flip_agreement(self.setup.to_memory_format(images))
        self.flip_allowed = self.flip_agreement >= FLIP_AGREEMENT

    def provenance(self) -> dict:
        """stage_match's teacher targets: the stages compared and their weight, or why auto left the term off."""
        if self.options.stage_match == 0:
            return {}
        return {"stage_match": {"weight": self.stage_weight, **self.stage_record}}

    def diagnostics(self) -> dict:
        if not self.options.student_augment:
            return {}
        return {"flip": self.flip_allowed, "flip_agreement": self.flip_agreement}

    def synthetic_batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adversary.generate(count, seed, with_teacher=True)

    def calibration_images(self, count: int, seed: int) -> torch.Tensor:
        return self.adversary.generate(count, seed, with_teacher=False)[0]

    def generator_artifact(self) -> dict:
        return self.adversary.artifact()

    def state_dict(self) -> dict:
        return {**self.adversary.state_dict(), "optimizer_s": self.optimizer_s.state_dict(),
                "scaler_s": self.scaler_s.state_dict(), "replay": self.replay.state(),
                "generator_steps": self.generator_steps, "flip_allowed": self.flip_allowed,
                "flip_agreement": self.flip_agreement, "stage_weight": self.stage_weight}

    def load_state_dict(self, state: dict, out: Path) -> None:
        # stage_match=auto decides again on resume; a run must go on as it began (its memory's rows hold the stage
        # outputs or not). A last.pt from before auto had a weight as its option, decided the same way again.
        began = state.get("stage_weight", self.stage_weight)
        if began != self.stage_weight:
            raise DfadError(f"this run began with stage_match at weight {began:g} and would resume at "
                            f"{self.stage_weight:g} ({self.stage_record.get('off_because', 'on')}): resume it with the "
                            "dfad-edge version that began it, on a machine like that one")
        self.adversary.load_state_dict(state)
        self.optimizer_s.load_state_dict(state["optimizer_s"])
        self.scaler_s.load_state_dict(state["scaler_s"])
        self.replay.load(state["replay"], self.setup.device, self._teacher_logits_of)
        # A last.pt from before student_augment: its flip was never decided (the option did not exist).
        self.generator_steps = state.get("generator_steps", 0)
        self.flip_allowed = state.get("flip_allowed", self.flip_allowed)
        self.flip_agreement = state.get("flip_agreement")

    def _teacher_logits_of(self, images: torch.Tensor) -> torch.Tensor:
        return self._teacher_targets_of(images)[0]

    def _teacher_targets_of(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's logits for images and, with feature_match or stage_match, its features from that same
        forward (the hooks keep only the latest one, so all are read here together), one row per image: the
        penultimate features, then each stage's output flattened."""
        with self.setup.autocast():
            logits = self.setup.teacher_logits(images)
        features = []
        if self.teacher_features is not None:
            features.append(self.teacher_features.latest.float())
        if self.teacher_stages is not None:
            features.extend(output.float().flatten(1) for output in self.teacher_stages.outputs())
        return logits, torch.cat(features, 1) if features else None
