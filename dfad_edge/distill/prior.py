"""The augmented image prior (Asano & Saeed, ICLR 2023): the student learns to match the teacher on heavily augmented
crops of a few natural images that are not the teacher's training data: photographs that ship with scikit-image, or a
user's own unlabeled images (``--images``). No generator is needed, so a step costs one teacher forward and one student
step. Optionally a share of each student batch comes from DFAD's generator (with its adversarial, BN-statistics and
class-balance terms), for teachers whose data look like no photograph (digits, text).

One iteration: ``student_steps`` student steps, each on a fresh batch of crops (random resized crops at many scales
and aspect ratios, rotation and shear, flips where the teacher is flip-invariant, colour jitter), CutMix (MixUp where
asked), teacher logits at ``temperature`` (KL); then, with a generator, one generator step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.unlabeled import BUILTIN, SourceImages, load_source_images
from ..errors import DfadError
from ..options import option
from .augment import (centre_crop, colour_jitter, crop_and_resize, cutmix, mixup, random_flip, random_rotate_shear,
                      resized_crop_boxes)
from .dfad import AdversarialGenerator
from .losses import kl_divergence, student_logit_loss
from .method import (FLIP_AGREEMENT, DistillMethod, Setup, forced_flip, register_method, scaled_step,
                     student_optimizer)
from .schedule import lr_factor, set_lr

# Crops of at most this many sources are cut per batch, so a folder of thousands of images is never converted whole.
SOURCES_PER_BATCH = 32


@dataclass
class PriorOptions:
    images: str = option(BUILTIN, "source images: builtin (photographs shipped in scikit-image) or a file, folder or "
                         "glob of unlabeled images (--images)")
    source_size: int = option(0, "sources are resized to this shorter side in pixels; 0: 4x the student's", min=0)
    batch_size: int = option(256, "images per student step", min=1, split=True)
    student_steps: int = option(5, "student steps per iteration (then one generator step, with a generator)", min=1)
    lr_student: float = option(0.1, "student SGD learning rate (cosine schedule)", above=0)
    momentum: float = option(0.9, "student SGD momentum", min=0, below=1)
    weight_decay: float = option(5e-4, "student SGD weight decay", min=0)
    temperature: float = option(8.0, "KL temperature of the teacher's and student's logits", above=0)
    crop_scale: tuple[float, ...] = option((0.01, 1.0), "crop area as a share of the source image: min,max",
                                           above=0, max=1)
    crop_ratio: tuple[float, ...] = option((0.75, 4 / 3), "crop aspect ratio (width/height): min,max", above=0)
    rotate: float = option(0.0, "rotation within +-degrees", min=0, max=180)
    shear: float = option(0.0, "horizontal shear within +-degrees", min=0, below=90)
    jitter: float = option(0.4, "colour jitter strength (brightness, contrast, saturation)", min=0, max=1)
    jitter_probability: float = option(0.5, "share of crops colour-jittered", min=0, max=1)
    flip: str = option("auto", "mirror crops; auto: only if the teacher's predictions survive a flip",
                       choices=("auto", "on", "off"))
    cutmix: float = option(1.0, "share of images with a CutMix box from another image", min=0, max=1)
    cutmix_alpha: float = option(0.25, "CutMix box size: 1 - lambda, lambda ~ Beta(alpha, alpha)", above=0)
    mixup: float = option(0.0, "share of images then blended with another image (MixUp)", min=0, max=1)
    mixup_alpha: float = option(1.0, "MixUp weight: lambda ~ Beta(alpha, alpha)", above=0)
    generator_fraction: float = option(0.25, "share of each student batch from DFAD's generator; 0: no generator",
                                       min=0, below=1)
    nz: int = option(256, "generator latent size", min=1)
    ngf: int = option(64, "generator width", min=1)
    generator_batch: int = option(64, "images per generator step", min=1, split=True)
    lr_generator: float = option(1e-3, "generator Adam learning rate", above=0)
    adversarial: float = option(1.0, "weight of the generator's adversarial term", min=0)
    bn_stats: float = option(10.0, "weight of the generator's BatchNorm-statistics term", min=0)
    class_balance: float = option(1.0, "weight of the generator's class-balance term", min=0)

    def validate(self, epochs: int) -> None:
        for name, pair in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio)):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise DfadError(f"{name} takes min,max with min <= max (e.g. --set {name}=0.001,0.25), got {pair}")


@register_method
class PriorMethod(DistillMethod):
    name = "prior"
    options_class = PriorOptions

    def __init__(self, setup: Setup, options: PriorOptions):
        super().__init__(setup, options)
        channels, height, width = setup.student_spec.shape
        self.crop_size = (height, width)
        self.sources: SourceImages = load_source_images(options.images, channels,
                                                        options.source_size or max(64, 4 * min(height, width)))
        self.canvas = self.sources.canvas.to(setup.device)
        self.sizes = self.sources.sizes
        # Few sources: one float copy, kept; many: converted per batch, a subset at a time.
        self.float_canvas = self.canvas.float().div_(255) if len(self.sources) <= SOURCES_PER_BATCH else None
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(setup.student_spec.mean, device=setup.device).view(shape)
        self.std = torch.tensor(setup.student_spec.std, device=setup.device).view(shape)
        self.adversary = None
        if options.generator_fraction > 0:
            self.adversary = AdversarialGenerator(setup, options.nz, options.ngf, options.lr_generator,
                                                  student_logit_loss("l1"), options.adversarial, options.bn_stats,
                                                  options.class_balance, options.generator_batch)
        self.generator = self.adversary.generator if self.adversary is not None else None
        self.optimizer_s, self.scaler_s = student_optimizer(setup, options)
        self.flip_allowed: bool | None = forced_flip(options.flip)
        self.flip_agreement: float | None = None
        if self.flip_allowed is None:
            # Judged once on a fixed batch of unflipped crops (its own random stream: the run's is untouched).
            self.flip_agreement = setup.flip_agreement(self.crops(512, torch.Generator().manual_seed(0), flip=False))
            self.flip_allowed = self.flip_agreement >= FLIP_AGREEMENT

    # --- images ----------------------------------------------------------------------------------------------
    def crops(self, count: int, rng: torch.Generator | None = None, flip: bool | None = None) -> torch.Tensor:
        """``count`` augmented crops, normalised in the student's spec (without CutMix, which mixes a batch)."""
        options = self.options
        canvas, sizes, picks = self._canvas_and_picks(count, rng)
        boxes = resized_crop_boxes(sizes, picks, tuple(options.crop_scale), tuple(options.crop_ratio), rng)
        rotated = options.rotate > 0 or options.shear > 0
        # Rotation and shear pull in the corners: cut the crop sqrt(2) larger and keep its centre.
        cut = tuple(math.ceil(side * math.sqrt(2)) for side in self.crop_size) if rotated else self.crop_size
        images = crop_and_resize(canvas, picks, boxes, cut)
        if rotated:
            images = centre_crop(random_rotate_shear(images, options.rotate, options.shear, rng), self.crop_size)
        if self.flip_allowed if flip is None else flip:
            images = random_flip(images, rng)
        if options.jitter > 0:
            images = colour_jitter(images, options.jitter, options.jitter_probability, rng)
        return (images - self.mean) / self.std

    def _canvas_and_picks(self, count: int, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float canvas the crops are cut from, its images' sizes, and each crop's index into it."""
        if self.float_canvas is not None:
            return self.float_canvas, self.sizes, torch.randint(len(self.sources), (count,), generator=rng)
        subset = torch.randperm(len(self.sources), generator=rng)[:SOURCES_PER_BATCH]
        picks = torch.randint(len(subset), (count,), generator=rng)
        return self.canvas[subset.to(self.canvas.device)].float().div_(255), self.sizes[subset], picks

    def student_batch(self) -> torch.Tensor:
        options, setup = self.options, self.setup
        generated = round(options.batch_size * options.generator_fraction) if self.adversary is not None else 0
        images = self.crops(options.batch_size - generated)
        if generated:
            with torch.no_grad(), setup.autocast():
                images = torch.cat([images, self.adversary.synthesize(generated).float()])
        if options.cutmix > 0:
            images = cutmix(images, options.cutmix, options.cutmix_alpha)
        if options.mixup > 0:
            images = mixup(images, options.mixup, options.mixup_alpha)
        return setup.to_memory_format(images)

    # --- training --------------------------------------------------------------------------------------------
    def student_step(self) -> torch.Tensor:
        setup = self.setup
        images = self.student_batch()
        with setup.autocast():
            with torch.no_grad():
                teacher_logits = setup.teacher_logits(images)
            loss = kl_divergence(setup.student_forward(images).float(), teacher_logits, self.options.temperature)
        scaled_step(loss, self.optimizer_s, self.scaler_s)
        return loss.detach()

    def iteration(self, progress: float) -> dict[str, torch.Tensor | int]:
        options = self.options
        factor = lr_factor("cosine", progress, self.setup.epochs)
        set_lr(self.optimizer_s, options.lr_student * factor)
        self.setup.student.train()
        losses = [self.student_step() for _ in range(options.student_steps)]
        terms: dict = {"loss_student": torch.stack(losses).mean()}
        images = options.student_steps * options.batch_size
        if self.adversary is not None:
            set_lr(self.adversary.optimizer, options.lr_generator * factor)
            terms.update(self.adversary.step())
            images += options.generator_batch
        terms["images"] = images
        return terms

    def learning_rates(self) -> dict[str, float]:
        rates = {"lr_student": self.optimizer_s.param_groups[0]["lr"]}
        if self.adversary is not None:
            rates["lr_generator"] = self.adversary.optimizer.param_groups[0]["lr"]
        return rates

    # --- what the loop reads ---------------------------------------------------------------------------------
    def _fixed_images(self, count: int, seed: int, with_teacher: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crops (and generator images, in the training share) for fixed random numbers: comparable across epochs,
        and the run's random stream is not moved."""
        generated = round(count * self.options.generator_fraction) if self.adversary is not None else 0
        rng = torch.Generator().manual_seed(seed)
        images = torch.cat([self.crops(min(256, count - generated - start), rng)
                            for start in range(0, count - generated, 256)])
        logits = None
        if with_teacher:
            with torch.no_grad():
                logits = torch.cat([self.setup.teacher_logits(images[i:i + 256]) for i in range(0, len(images), 256)])
        if generated:
            fake, fake_logits = self.adversary.generate(generated, seed, with_teacher)
            images = torch.cat([images, fake])
            logits = torch.cat([logits, fake_logits]) if with_teacher else None
        return images, logits

    def synthetic_batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fixed_images(count, seed, with_teacher=True)

    def calibration_images(self, count: int, seed: int) -> torch.Tensor:
        return self._fixed_images(count, seed, with_teacher=False)[0]

    def diagnostics(self) -> dict:
        return {"source_images": len(self.sources), "flip": self.flip_allowed, "flip_agreement": self.flip_agreement}

    def provenance(self) -> dict:
        return {"source_images": self.sources.records}

    def generator_artifact(self) -> dict | None:
        return self.adversary.artifact() if self.adversary is not None else None

    # --- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer_s": self.optimizer_s.state_dict(), "scaler_s": self.scaler_s.state_dict(),
                "adversary": self.adversary.state_dict() if self.adversary is not None else None,
                "flip_allowed": self.flip_allowed, "flip_agreement": self.flip_agreement,
                "source_images": self.sources.records}

    def load_state_dict(self, state: dict, out: Path) -> None:
        if state["source_images"] != self.sources.records:
            raise DfadError(f"the source images ({self.options.images}) changed since this run started: a resumed run "
                            "must see the same images. Restore them, or start a new run with another --out")
        self.optimizer_s.load_state_dict(state["optimizer_s"])
        self.scaler_s.load_state_dict(state["scaler_s"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
        self.flip_allowed, self.flip_agreement = state["flip_allowed"], state["flip_agreement"]
