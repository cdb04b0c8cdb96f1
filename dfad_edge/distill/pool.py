"""The pool method: few-step synthesis into a pool of images, and a student that learns from the whole pool.

After Fast-DFKD (Fang et al. 2022) and NAYER (Tran et al. 2024); learnt from their papers, no code copied.

Synthesis, one batch at a time: class-balanced target labels; a generator decodes each image from a fresh input (a
learnable latent, or a class code through a noisy layer re-initialised for the batch); ``synth_steps`` Adam steps on
BatchNorm-statistics matching (blended with the previous batch's statistics) + the teacher's cross-entropy towards the
targets on augmented views + an adversarial term (student-teacher KL on samples both agree on, after the warm-up).
With ``meta=fomaml`` each batch starts from a shared generator whose initialisation is meta-learnt (first-order MAML:
the inner steps' gradients update it), so a few steps per batch suffice. The images go into a bounded pool with the
teacher's logits for them.

Student: ``student_steps`` SGD steps per synthesised batch on random pool samples, KL at a temperature against the
stored teacher logits (a step then costs only the student) or against fresh teacher logits on augmented views.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..distributed import average_gradients, rank, rank_local_leaf, sync_batchnorm, world_size
from ..errors import DfadError
from ..models import create_model
from ..models.generator import PixelGenerator
from ..options import option
from .augment import horizontal_flip_half, random_shift_flip
from .losses import (BatchNormStatistics, agreement_masked_adversarial, class_balance_loss, require_batchnorm,
                     student_logit_loss)
from .method import (FLIP_AGREEMENT, GENERATOR_FORMAT, DistillMethod, Setup, adam, forced_flip, generator_kwargs,
                     register_method, scaled_step, student_optimizer)
from .schedule import lr_factor, set_lr
from .synthetic_pool import SyntheticPool


@dataclass
class PoolOptions:
    generator: str = option("pixels", "pixels: a decoder ending in a sigmoid (Fast-DFKD, NAYER), normalised like real "
                            "images; a: DFAD's generator A, ending in an affine-free BatchNorm in the normalised space",
                            choices=("pixels", "a"))
    nz: int = option(256, "generator input size", min=1)
    ngf: int = option(64, "generator width", min=1)
    generator_input: str = option("latent", "the generator's input: a learnable latent per batch (Fast-DFKD), or noise "
                                  "plus a learnt code of the target class (class-conditional)", choices=("latent", "label"))
    batch_size: int = option(256, "images synthesised per batch", min=1, split=True)
    synth_steps: int = option(2, "generator steps per synthesised batch", min=1)
    lr_generator: float = option(5e-3, "generator Adam learning rate", above=0)
    lr_latent: float = option(0.01, "learning rate of the per-batch latents (generator_input=latent)", above=0)
    meta: str = option("fomaml", "fomaml: meta-learn the generator's starting point from the inner steps' gradients; "
                       "none: each batch starts from where the last ended", choices=("fomaml", "none"))
    bn_stats: float = option(10.0, "weight of BatchNorm-statistics matching", min=0)
    bn_reduction: str = option("mean", "the teacher's layers' terms averaged, or summed (DeepInversion, Fast-DFKD)",
                               choices=("mean", "sum"))
    bn_momentum: float = option(0.9, "share of the previous batch's statistics blended into this batch's", min=0, below=1)
    ce: float = option(0.5, "weight of the teacher's cross-entropy towards the batch's target classes", min=0)
    class_balance: float = option(0.0, "weight of DAFL's class-balance term on the teacher's predictions", min=0)
    diversity: float = option(0.0, "weight of the mode-seeking term: two images of one class from different noise "
                              "should differ (keeps a class-conditional generator from one image per class)", min=0)
    adversarial: float = option(1.0, "weight of the adversarial term", min=0)
    adversarial_loss: str = option("masked_kl", "masked_kl: student-teacher KL on samples both agree on (Fast-DFKD); "
                                   "l1: the L1 distance of their logits (DFAD)", choices=("masked_kl", "l1"))
    adversarial_start: float = option(0.2, "share of the run before the adversarial term starts (the student must have "
                                      "learnt something first: an untrained student's logits make the term explode)",
                                      min=0, max=1)
    synth_augment: bool = option(True, "the teacher judges shifted (and, if flip-invariant, mirrored) views")
    flip: str = option("auto", "mirror images in augmentation; auto: only if the teacher's predictions survive a flip",
                       choices=("auto", "on", "off"))
    samples_per_step: int = option(0, "extra batches sampled from the generator (forward only, labelled by the teacher) "
                                   "into the pool after each synthesised batch: cheap fresh images", min=0)
    pool_size: int = option(50000, "images kept; the oldest are replaced when full", min=1, split=True)
    recent_fraction: float = option(0.0, "share of each student batch drawn from the newest images (this iteration's)",
                                    min=0, max=1)
    student_batch: int = option(256, "pool images per student step", min=1, split=True)
    student_steps: int = option(10, "student steps per synthesised batch", min=0)
    lr_student: float = option(0.2, "student SGD learning rate (cosine to 0 after the warm-up)", above=0)
    momentum: float = option(0.9, "student SGD momentum", min=0, below=1)
    weight_decay: float = option(1e-4, "student SGD weight decay", min=0)
    student_loss: str = option("kl", "student-teacher discrepancy", choices=("kl", "l1", "mse"))
    temperature: float = option(20.0, "softening temperature of the KL", above=0)
    warmup: float = option(0.1, "share of the run that only synthesises (the student and adversarial term wait)",
                           min=0, below=1)
    cache_logits: bool = option(True, "store the teacher's logits with each image (student steps cost only the student); "
                                "false: the teacher labels every augmented student batch afresh")
    student_augment: bool = option(True, "augment student batches: mirror (if flip-invariant) with cached logits, "
                                   "shift and mirror with fresh ones")

    def validate(self, epochs: int) -> None:
        if self.pool_size < self.batch_size:
            raise DfadError(f"pool_size {self.pool_size} is smaller than batch_size {self.batch_size}: the pool must "
                            "hold one synthesised batch")
        if self.pool_size < self.student_batch:
            raise DfadError(f"pool_size {self.pool_size} is smaller than student_batch {self.student_batch}: "
                            "the student could never draw a full batch")


class SynthesisGenerator(nn.Module):
    """A decoder whose images come out normalised (the models' input space), and for ``generator_input=label`` a learnt
    code per class added to each sample's noise: a class-conditional generator reaches a batch's target classes within
    a few steps, where an unconditional one must be steered there by the few updates of its latents."""

    def __init__(self, decoder: nn.Module, num_classes: int | None, mean: list[float], std: list[float]):
        super().__init__()
        self.decoder, self.nz = decoder, decoder.nz
        self.codes = nn.Embedding(num_classes, decoder.nz) if num_classes else None
        # A pixel decoder's [0, 1] output is normalised like real data; generator A's output already is.
        self.pixel_output = isinstance(decoder, PixelGenerator)
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        images = self.decoder(noise if self.codes is None else self.codes(targets) + noise)
        return (images - self.mean) / self.std if self.pixel_output else images


def class_pairs(batch_size: int) -> int:
    """Distinct classes in a batch of balanced_targets: its images come in pairs of one class."""
    return -(-batch_size // 2)


def balanced_targets(batch_size: int, num_classes: int, device: torch.device, rank: int = 0,
                     first_class: int = 0) -> torch.Tensor:
    """Every class equally often (up to one), in random order; the second half repeats the first, so sample i and
    i + batch/2 share a class (the pairs the mode-seeking term compares). The classes run on from ``first_class``, so
    with fewer images than classes successive batches cover them all in turn (1000 classes, batches of 64: every class
    in 32 batches). Under torchrun ``batch_size`` is a rank's share and the ranks' shares continue one another's
    classes, so together they are one batch's."""
    half = class_pairs(batch_size)
    classes = torch.arange(half, device=device) + first_class + rank * half
    first = (classes % num_classes)[torch.randperm(half, device=device)]
    return torch.cat([first, first])[:batch_size]


def mode_seeking_loss(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSGAN's mode-seeking term for pairs (i, i + batch/2) of one class: minus the image distance per unit of noise
    distance, so images cannot ignore their noise."""
    half = len(images) // 2
    image_distance = (images[:half] - images[half:2 * half]).abs().flatten(1).mean(1)
    noise_distance = (noise[:half] - noise[half:2 * half]).abs().mean(1)
    return -(image_distance / noise_distance).mean()


@register_method
class PoolMethod(DistillMethod):
    name = "pool"
    options_class = PoolOptions
    rank_local_state = ("pool", "bn_previous")  # each rank's images, and the statistics of its last batch

    def __init__(self, setup: Setup, options: PoolOptions):
        super().__init__(setup, options)
        if options.bn_stats > 0:
            require_batchnorm(setup.teacher, "bn_stats")
        self.generator_kwargs = generator_kwargs(setup, options.nz, options.ngf)
        conditional = setup.num_classes if options.generator_input == "label" else None
        decoder = create_model("generator_pixels" if options.generator == "pixels" else "generator_a", **self.generator_kwargs)
        spec = setup.student_spec
        self.generator = SynthesisGenerator(decoder, conditional, spec.mean, spec.std)
        self.generator = sync_batchnorm(self.generator.to(setup.device), setup.device)
        if setup.channels_last:
            self.generator.to(memory_format=torch.channels_last)
        # The meta optimiser's step is the sum of the inner steps' gradients: Adam at the inner rate x steps (Fast-DFKD).
        self.meta_optimizer = adam(self.generator.parameters(), options.lr_generator * options.synth_steps, (0.5, 0.999),
                                   setup.device)
        # meta=none: one generator trained on throughout, with one optimiser (its moments carry across batches).
        self.optimizer_g = adam(self.generator.parameters(), options.lr_generator, (0.9, 0.999), setup.device)
        self.adversarial_loss = (agreement_masked_adversarial if options.adversarial_loss == "masked_kl"
                                 else lambda student, teacher: -nn.functional.l1_loss(student, teacher))
        self.bn_statistics = (BatchNormStatistics(setup.teacher, options.bn_momentum, options.bn_reduction)
                              if options.bn_stats > 0 else None)
        self.student_loss = student_logit_loss(options.student_loss, options.temperature)
        self.optimizer_s, self.scaler_s = student_optimizer(setup, options)
        self.scaler_g = setup.generator_scaler()
        self.pool = SyntheticPool(options.pool_size, setup.student_spec.shape, setup.num_classes, setup.device)
        self.flip_allowed: bool | None = forced_flip(options.flip)
        self.flip_agreement: float | None = None
        self.first_class = 0  # the class the next batch's targets start from (balanced_targets)

    @property
    def student_batch_size(self) -> int:
        return self.options.student_batch

    # --- synthesis -----------------------------------------------------------------------------------------------
    def _fresh_inputs(self, count: int) -> torch.Tensor:
        """Per-sample noise; with generator_input=latent it is the batch's learnable latent (Fast-DFKD)."""
        noise = torch.randn(count, self.options.nz, device=self.setup.device)
        return rank_local_leaf(noise.requires_grad_(self.options.generator_input == "latent"))

    def _teacher_view(self, images: torch.Tensor) -> torch.Tensor:
        return random_shift_flip(images, flip=bool(self.flip_allowed)) if self.options.synth_augment else images

    def synthesize_batch(self, progress: float) -> dict[str, torch.Tensor]:
        """Make one batch with a few generator steps and put it into the pool."""
        options, setup = self.options, self.setup
        targets = balanced_targets(options.batch_size, setup.num_classes, setup.device, rank(), self.first_class)
        self.first_class = (self.first_class + world_size() * class_pairs(options.batch_size)) % setup.num_classes
        inputs = self._fresh_inputs(len(targets))
        if options.meta == "fomaml":
            fast = copy.deepcopy(self.generator)
            optimizers = [adam(fast.parameters(), options.lr_generator, (0.5, 0.999), setup.device)]
        else:
            fast, optimizers = self.generator, [self.optimizer_g]
        if inputs.requires_grad:
            optimizers.append(adam([inputs], options.lr_latent, (0.5, 0.999), setup.device))
        fast.train()
        # The adversarial term sees the student in training mode (batch statistics), as DFAD does: measured better here
        # than judging it with running statistics that lag behind its weights.
        setup.student.train()
        adversarial_on = options.adversarial > 0 and progress >= max(options.warmup, options.adversarial_start)
        zero = torch.zeros((), device=setup.device)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for _ in range(options.synth_steps):
            with setup.autocast(), setup.frozen(setup.student):
                images = setup.to_memory_format(fast(targets, inputs))
                view = self._teacher_view(images)
                teacher_logits, bn_loss = setup.teacher_logits_and_bn_loss(view, self.bn_statistics)
                ce_loss = nn.functional.cross_entropy(teacher_logits, targets)
                adversarial = (self.adversarial_loss(setup.student_forward(view).float(), teacher_logits)
                               if adversarial_on else zero)
                diversity = mode_seeking_loss(images.float(), inputs) if options.diversity > 0 else zero
                balance = (class_balance_loss(teacher_logits, distinct=class_pairs(len(targets)))
                           if options.class_balance > 0 else zero)
                loss = (options.bn_stats * bn_loss + options.ce * ce_loss + options.adversarial * adversarial
                        + options.diversity * diversity + options.class_balance * balance)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            # fp16 (CUDA without native bf16): a scaled loss keeps small gradients from underflowing.
            self.scaler_g.scale(loss).backward()
            for optimizer in optimizers:
                self.scaler_g.unscale_(optimizer)
            average_gradients(fast.parameters())
            if options.meta == "fomaml":
                self._add_meta_gradients(fast)
            for optimizer in optimizers:
                self.scaler_g.step(optimizer)
            self.scaler_g.update()
        if options.meta == "fomaml":
            self.meta_optimizer.step()
        if self.bn_statistics is not None:
            self.bn_statistics.remember_batch()
        if options.synth_augment:
            # The teacher judged augmented views: the stored images need its logits for themselves.
            with torch.no_grad(), setup.autocast():
                images = setup.to_memory_format(fast(targets, inputs))
                teacher_logits = setup.teacher_logits(images)
        # Without augmentation the last step's images and the teacher's logits for them are stored as judged (one
        # step behind the generator's update, and no extra forward pass).
        self.pool.add(images.detach().float(), teacher_logits.detach())
        self._sample_into_pool(targets, options.samples_per_step)
        return {"loss_generator": loss.detach(), "loss_bn_stats": bn_loss.detach(), "loss_ce": ce_loss.detach(),
                "loss_adversarial": adversarial.detach(), "loss_diversity": diversity.detach()}

    def _add_meta_gradients(self, fast: nn.Module) -> None:
        """First-order MAML: the inner step's (unscaled) gradients add up into the meta-gradient. A step whose fp16
        gradients overflowed (the scaler skips it) adds nothing, decided on the device without a host sync."""
        gradients = [p.grad for p in fast.parameters() if p.grad is not None]
        finite = torch.stack([g.float().sum() for g in gradients]).isfinite().all()
        for meta_parameter, fast_parameter in zip(self.generator.parameters(), fast.parameters()):
            if fast_parameter.grad is None:
                continue
            gradient = torch.where(finite, fast_parameter.grad, torch.zeros_like(fast_parameter.grad))
            meta_parameter.grad = gradient if meta_parameter.grad is None else meta_parameter.grad + gradient

    @torch.no_grad()
    def _sample_into_pool(self, targets: torch.Tensor, batches: int) -> None:
        """Fresh images from the generator as it is now, forward only: far cheaper than a synthesis step."""
        for _ in range(batches):
            targets = targets[torch.randperm(len(targets), device=targets.device)]
            with self.setup.autocast():
                noise = torch.randn(len(targets), self.options.nz, device=self.setup.device)  # nothing to learn here
                images = self.setup.to_memory_format(self.generator(targets, noise))
                self.pool.add(images.float(), self.setup.teacher_logits(images))

    @torch.no_grad()
    def _decide_flip(self) -> None:
        """Mirror in augmentation only if the teacher is (nearly) flip-invariant on its own synthetic images, judged
        once, on the newest pool images when the student starts (early images are too rough to tell)."""
        self.flip_agreement = self.setup.flip_agreement(self.pool.images(self.pool.newest(512)))
        self.flip_allowed = self.flip_agreement >= FLIP_AGREEMENT

    # --- student -------------------------------------------------------------------------------------------------
    def student_step(self) -> torch.Tensor:
        options, setup = self.options, self.setup
        recent = options.batch_size * (1 + options.samples_per_step)
        indices = self.pool.sample_indices(options.student_batch, recent, options.recent_fraction)
        images = self.pool.images(indices)
        if options.cache_logits:
            if options.student_augment and self.flip_allowed:
                # A mirrored image keeps its stored logits: valid for flip-invariant teachers (checked, _decide_flip).
                images = horizontal_flip_half(images)
            images = setup.to_memory_format(images)
            teacher_logits = self.pool.teacher_logits[indices].float()
        else:
            if options.student_augment:
                images = random_shift_flip(images, flip=bool(self.flip_allowed))
            images = setup.to_memory_format(images)
            with torch.no_grad(), setup.autocast():
                teacher_logits = setup.teacher_logits(images)
        with setup.autocast():
            loss = self.student_loss(setup.student_forward(images).float(), teacher_logits)
        scaled_step(loss, self.optimizer_s, self.scaler_s)
        return loss.detach()

    def _set_learning_rate(self, progress: float) -> None:
        set_lr(self.optimizer_s, self.options.lr_student * lr_factor("cosine", progress, self.setup.epochs,
                                                                     warmup=self.options.warmup))

    def student_is_training(self, progress: float) -> bool:
        return progress >= self.options.warmup and self.pool.filled >= self.options.student_batch

    def iteration(self, progress: float) -> dict[str, torch.Tensor]:
        terms = self.synthesize_batch(progress)
        self._set_learning_rate(progress)
        steps = self.options.student_steps if self.student_is_training(progress) else 0
        if steps and self.flip_allowed is None:
            self._decide_flip()
        losses = [self.student_step() for _ in range(steps)]
        terms["loss_student"] = torch.stack(losses).mean() if losses else torch.zeros((), device=self.setup.device)
        options = self.options
        regenerated = 1 if options.synth_augment else 0  # the stored images made again after augmented steps
        terms["images"] = (options.batch_size * (options.synth_steps + regenerated + 2 * options.samples_per_step)
                           + steps * options.student_batch)
        return terms

    def learning_rates(self) -> dict[str, float]:
        return {"lr_student": self.optimizer_s.param_groups[0]["lr"], "lr_generator": self.options.lr_generator}

    # --- what the loop reads -------------------------------------------------------------------------------------
    def synthetic_batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest pool images: what synthesis makes now."""
        indices = self.pool.newest(count)
        return self.pool.images(indices), self.pool.teacher_logits[indices].float()

    def calibration_images(self, count: int, seed: int) -> torch.Tensor:
        """A seeded random sample of the pool: the images the student learnt from."""
        picks = torch.randperm(self.pool.filled, generator=torch.Generator().manual_seed(seed))[:count]
        return self.pool.images(picks.to(self.pool.stored.device))

    def diagnostics(self) -> dict:
        from .diagnostics import normalised_entropy

        histogram = self.pool.class_histogram()
        return {"pool_images": self.pool.filled, "pool_class_entropy": round(normalised_entropy(histogram), 4),
                "pool_class_histogram": histogram.int().tolist(), "flip": self.flip_allowed,
                "flip_agreement": self.flip_agreement}

    def generator_artifact(self) -> dict:
        return {"format": GENERATOR_FORMAT, "arch": "generator_pixels" if self.options.generator == "pixels" else "generator_a",
                "arch_kwargs": self.generator_kwargs,
                "state_dict": {k: v.detach().cpu() for k, v in self.generator.decoder.state_dict().items()},
                "class_codes": self.generator.codes.weight.detach().cpu() if self.generator.codes is not None else None,
                "output": "pixels" if self.options.generator == "pixels" else "normalised"}

    # --- resume --------------------------------------------------------------------------------------------------
    def save_files(self, out: Path) -> None:
        self.pool.save(out / "pool")

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(), "optimizer_g": self.optimizer_g.state_dict(),
                "optimizer_s": self.optimizer_s.state_dict(),
                "scaler_s": self.scaler_s.state_dict(), "scaler_g": self.scaler_g.state_dict(), "pool": self.pool.state(),
                "bn_previous": self.bn_statistics.state() if self.bn_statistics is not None else None,
                "flip_allowed": self.flip_allowed, "flip_agreement": self.flip_agreement, "first_class": self.first_class}

    def load_state_dict(self, state: dict, out: Path) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_s.load_state_dict(state["optimizer_s"])
        self.scaler_s.load_state_dict(state["scaler_s"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.pool.load(out / "pool", state["pool"])
        if self.bn_statistics is not None and state["bn_previous"] is not None:
            self.bn_statistics.load([(m.to(self.setup.device), v.to(self.setup.device)) for m, v in state["bn_previous"]])
        self.flip_allowed, self.flip_agreement = state["flip_allowed"], state["flip_agreement"]
        self.first_class = state["first_class"]
