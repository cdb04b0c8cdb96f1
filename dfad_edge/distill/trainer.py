"""The DFAD loop: student steps on detached synthetic batches, then one adversarial generator step.

Run folder: config.json, metrics.jsonl, student.pt, generator.pt, last.pt, samples/epoch_NNNN.png, result.json.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..checkpoint import InputSpec, ModelCheckpoint, load_checkpoint, model_checkpoint, safe_torch_load
from ..data import check_compatible, make_loader, resolve_source
from ..errors import DfadError
from ..evaluate import loader_accuracy
from ..io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text
from ..models import create_model, default_input_size
from ..progress import log, new_progress
from ..runtime import autocast, autocast_dtype, resolve_device, restore_rng_state, rng_state, seed_everything
from .config import DistillConfig
from .diagnostics import collapse_diagnostics, collapse_warning
from .losses import BatchNormStatistics, class_balance_loss, student_logit_loss
from .samples import save_sample_grid

STATE_FORMAT = "dfad-edge-distill-state/1"
GENERATOR_FORMAT = "dfad-edge-generator/1"


class RunInterrupted(DfadError):
    """Raised after a clean save on Ctrl-C / SIGTERM."""


class ReplayMemory:
    """A ring buffer of past synthetic images; mixing them into student steps keeps the student from
    forgetting regions of input space the generator has moved away from."""

    def __init__(self, capacity: int):
        self.capacity, self.images, self.count = capacity, None, 0

    def add(self, images: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        if self.images is None:
            self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=images.dtype, device=images.device)
        positions = (torch.arange(len(images), device=images.device) + self.count) % self.capacity
        self.images[positions] = images.detach()
        self.count += len(images)

    def sample(self, size: int) -> torch.Tensor | None:
        filled = min(self.count, self.capacity)
        if self.images is None or filled < size:
            return None
        return self.images[torch.randint(0, filled, (size,), device=self.images.device)]

    def state(self) -> dict:
        return {"images": self.images, "count": self.count}

    def load(self, state: dict) -> None:
        self.images, self.count = state["images"], state["count"]


@contextmanager
def graceful_interrupts():
    """First Ctrl-C or SIGTERM sets a flag the loop checks between iterations (so state is saved whole);
    a second Ctrl-C aborts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, _frame):
        if requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.set()
        log("[yellow]stopping after this iteration and saving last.pt (Ctrl-C again to abort at once)[/]")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: DistillConfig):
    # Stepped once per epoch: stepping an epoch-milestone schedule per iteration is a known DFAD bug.
    if config.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)


def load_generator(path: Path) -> tuple[nn.Module, InputSpec]:
    raw = safe_torch_load(path)
    if not isinstance(raw, dict) or raw.get("format") != GENERATOR_FORMAT:
        raise DfadError(f"{path} is not a dfad-edge generator checkpoint (written by dfad-edge distill)")
    generator = create_model(raw["arch"], **raw["arch_kwargs"])
    generator.load_state_dict(raw["state_dict"], strict=True)
    return generator, InputSpec(**raw["input_spec"])


class DistillRun:
    def __init__(self, config: DistillConfig, teacher_path: Path, out: Path, eval_data: str | None = None,
                 data_dir: Path | None = None, download: bool = False, resume: bool = False):
        config.validate()
        self.out, self.resume, self.teacher_path = Path(out), resume, Path(teacher_path)
        self.last_path = self.out / "last.pt"
        if self.last_path.exists() and not resume:
            raise DfadError(f"{self.out} already holds a run: pass --resume to continue it, or choose a new --out")
        if resume:
            if not self.last_path.exists():
                raise DfadError(f"--resume: no {self.last_path} to resume from")
            # The saved config wins: a resumed run must be the same run.
            config = DistillConfig.from_dict(safe_torch_load(self.last_path)["config"])
        self.config = config
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self.channels_last = config.channels_last
        self.teacher_checkpoint = load_checkpoint(self.teacher_path)
        self.eval_source = resolve_source(eval_data, data_dir, download) if eval_data else None
        self.eval_data = eval_data
        seed_everything(config.seed)
        self.student_spec = self._student_spec()
        self._build_models()
        if self.eval_source is not None:
            check_compatible(self.eval_source, self.teacher_checkpoint.input_spec,
                             self.teacher_checkpoint.num_classes, self.teacher_checkpoint.class_names)

    # --- set-up -----------------------------------------------------------------------------------------------
    def _student_spec(self) -> InputSpec:
        teacher_spec = self.teacher_checkpoint.input_spec
        height, width = self.config.student_input_size or default_input_size(self.config.student_arch)
        return InputSpec(teacher_spec.channels, height, width, list(teacher_spec.mean), list(teacher_spec.std))

    def _build_models(self) -> None:
        config, teacher_ckpt = self.config, self.teacher_checkpoint
        channels, height, width = self.student_spec.shape
        if height != width:
            raise DfadError(f"generator_a makes square images; the student input is {height}x{width}")
        self.num_classes = teacher_ckpt.num_classes
        self.student_kwargs = {"num_classes": self.num_classes, "in_channels": channels}
        self.generator_kwargs = {"nz": config.nz, "ngf": config.ngf, "img_size": height, "channels": channels}
        # Frozen and always in eval mode: synthetic batches must never overwrite its BatchNorm statistics.
        self.teacher = teacher_ckpt.build_model().to(self.device).eval().requires_grad_(False)
        self.student = create_model(config.student_arch, **self.student_kwargs).to(self.device)
        self.generator = create_model("generator_a", **self.generator_kwargs).to(self.device)
        if self.channels_last:
            for model in (self.teacher, self.student, self.generator):
                model.to(memory_format=torch.channels_last)
        self.bn_statistics = BatchNormStatistics(self.teacher) if config.loss.bn_stats > 0 else None
        self.teacher_forward = torch.compile(self.teacher) if config.compile else self.teacher
        self.student_forward = torch.compile(self.student) if config.compile else self.student
        self.student_loss = student_logit_loss(config.loss.student, config.loss.temperature)
        self.optimizer_s = torch.optim.SGD(self.student.parameters(), lr=config.lr_student, momentum=config.momentum,
                                           weight_decay=config.weight_decay)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr_generator)
        self.scheduler_s = _make_scheduler(self.optimizer_s, config)
        self.scheduler_g = _make_scheduler(self.optimizer_g, config)
        self.replay = ReplayMemory(config.replay_size)
        teacher_size = (teacher_ckpt.input_spec.height, teacher_ckpt.input_spec.width)
        self.teacher_size = teacher_size if teacher_size != (height, width) else None

    # --- one iteration ---------------------------------------------------------------------------------------
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher_size is not None:
            # Differentiable resize: the teacher sees the student's images at its own input size.
            images = F.interpolate(images, size=self.teacher_size, mode="bilinear", align_corners=False)
        return self.teacher_forward(images).float()

    def _synthesize(self, batch_size: int) -> torch.Tensor:
        z = torch.randn(batch_size, self.config.nz, device=self.device)
        images = self.generator(z)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def student_step(self) -> float:
        config = self.config
        replay_count = int(config.batch_size * config.replay_fraction) if config.replay_size else 0
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            fresh = self._synthesize(config.batch_size - replay_count if self.replay.count >= config.batch_size
                                     else config.batch_size).float()
        replayed = self.replay.sample(replay_count) if replay_count else None
        self.replay.add(fresh)
        images = fresh if replayed is None else torch.cat([fresh, replayed])
        with autocast(self.device, self.amp_dtype):
            with torch.no_grad():
                teacher_logits = self.teacher_logits(images)
            loss = self.student_loss(self.student_forward(images).float(), teacher_logits)
        self.optimizer_s.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_s.step()
        return float(loss.detach())

    def generator_step(self) -> dict[str, float]:
        weights = self.config.loss
        with autocast(self.device, self.amp_dtype):
            images = self._synthesize(self.config.batch_size)
            if self.bn_statistics is not None:
                with self.bn_statistics:
                    teacher_logits = self.teacher_logits(images)
                bn_loss = self.bn_statistics.loss()
            else:
                teacher_logits, bn_loss = self.teacher_logits(images), torch.zeros((), device=self.device)
            # The generator maximises the student-teacher discrepancy; the gradient flows through both networks.
            adversarial = -self.student_loss(self.student_forward(images).float(), teacher_logits)
            balance = class_balance_loss(teacher_logits) if weights.class_balance > 0 else torch.zeros((), device=self.device)
            loss = weights.adversarial * adversarial + weights.bn_stats * bn_loss + weights.class_balance * balance
        self.optimizer_g.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_g.step()
        return {"loss_generator": float(loss.detach()), "loss_adversarial": float(adversarial.detach()),
                "loss_bn_stats": float(bn_loss.detach()), "loss_class_balance": float(balance.detach())}

    def iteration(self) -> dict[str, float]:
        self.student.train()
        self.generator.train()
        student_losses = [self.student_step() for _ in range(self.config.student_steps)]
        terms = self.generator_step()
        terms["loss_student"] = sum(student_losses) / len(student_losses)
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(", ".join(f"{k}={terms[k]}" for k in bad))
        return terms

    # --- per-epoch work --------------------------------------------------------------------------------------
    @torch.no_grad()
    def synthetic_batch(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images from a copy of the generator (batch statistics, as in training) for fixed latents,
        so diagnostics are comparable across epochs and sampling does not disturb training state."""
        generator = copy.deepcopy(self.generator).train()
        latent_rng = torch.Generator(device="cpu").manual_seed(seed)
        images, logits = [], []
        for start in range(0, count, self.config.batch_size):
            size = min(self.config.batch_size, count - start)
            z = torch.randn(size, self.config.nz, generator=latent_rng).to(self.device)
            with autocast(self.device, self.amp_dtype):
                batch = generator(z).float()
                logits.append(self.teacher_logits(batch))
            images.append(batch)
        return torch.cat(images), torch.cat(logits)

    def evaluate(self, model: nn.Module, spec: InputSpec, description: str) -> dict[str, float]:
        loader = make_loader(self.eval_source, "test", spec, batch_size=256)
        return loader_accuracy(model, loader, self.device, description)

    def student_checkpoint(self, epoch: int, accuracy: dict | None) -> ModelCheckpoint:
        return model_checkpoint(
            self.student, self.config.student_arch, self.student_kwargs, self.num_classes, self.student_spec,
            self.teacher_checkpoint.class_names, "distill", teacher=str(self.teacher_path), epoch=epoch,
            test_accuracy=accuracy, eval_data=self.eval_data, preset=self.config.preset,
        )

    def save_student_and_generator(self, epoch: int, accuracy: dict | None) -> None:
        self.student_checkpoint(epoch, accuracy).save(self.out / "student.pt")
        atomic_torch_save({
            "format": GENERATOR_FORMAT, "arch": "generator_a", "arch_kwargs": self.generator_kwargs,
            "state_dict": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
            "input_spec": vars(self.student_spec), "teacher": str(self.teacher_path), "epoch": epoch,
            "dfad_edge_version": __version__,
        }, self.out / "generator.pt")

    def save_state(self, epoch: int, iteration: int, accumulators: dict) -> None:
        atomic_torch_save({
            "format": STATE_FORMAT, "config": self.config.to_dict(), "epoch": epoch, "iteration": iteration,
            "student": self.student.state_dict(), "generator": self.generator.state_dict(),
            "optimizer_s": self.optimizer_s.state_dict(), "optimizer_g": self.optimizer_g.state_dict(),
            "scheduler_s": self.scheduler_s.state_dict(), "scheduler_g": self.scheduler_g.state_dict(),
            "rng": rng_state(), "replay": self.replay.state(), "accumulators": accumulators,
            "best": self.best, "teacher_accuracy": self.teacher_accuracy, "elapsed_s": self.elapsed_s,
        }, self.last_path)

    def load_state(self) -> tuple[int, int, dict]:
        state = safe_torch_load(self.last_path)
        if state.get("format") != STATE_FORMAT:
            raise DfadError(f"{self.last_path} is not a dfad-edge distillation state")
        self.student.load_state_dict(state["student"])
        self.generator.load_state_dict(state["generator"])
        self.optimizer_s.load_state_dict(state["optimizer_s"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.scheduler_s.load_state_dict(state["scheduler_s"])
        self.scheduler_g.load_state_dict(state["scheduler_g"])
        self.replay.load(state["replay"])
        if self.replay.images is not None:
            self.replay.images = self.replay.images.to(self.device)
        restore_rng_state(state["rng"])
        self.best, self.teacher_accuracy, self.elapsed_s = state["best"], state["teacher_accuracy"], state["elapsed_s"]
        self._drop_metrics_after(state["epoch"])
        return state["epoch"], state["iteration"], state["accumulators"]

    def _drop_metrics_after(self, epoch: int) -> None:
        """A hard kill between writing an epoch's metrics and its checkpoint would otherwise log that epoch twice."""
        metrics = self.out / "metrics.jsonl"
        if not metrics.exists():
            return
        kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    # --- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        config = self.config
        self.best = {"epoch": 0, "accuracy": None}
        self.teacher_accuracy, self.elapsed_s = None, 0.0
        if self.resume:
            epoch, iteration, accumulators = self.load_state()
            log(f"resuming {self.out} at epoch {epoch + 1}, iteration {iteration}")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            epoch, iteration, accumulators = 0, 0, {}
            if self.eval_source is not None:
                self.teacher_accuracy = self.evaluate(self.teacher, self.teacher_checkpoint.input_spec, "  teacher eval")
                log(f"teacher top-1 on {self.eval_data}: {self.teacher_accuracy['100%']:.2%}")
            else:
                log("no --eval-data: the last student is kept; no best-epoch selection is possible")
        atomic_write_json(self.out / "config.json", {**config.to_dict(), "teacher": str(self.teacher_path),
                                                     "eval_data": self.eval_data, "device": str(self.device),
                                                     "amp_dtype": str(self.amp_dtype), "channels_last": self.channels_last})
        total = config.epochs * config.iters_per_epoch
        with graceful_interrupts() as stop_requested, new_progress() as progress:
            task = progress.add_task("distill", total=total, completed=epoch * config.iters_per_epoch + iteration, status="")
            while epoch < config.epochs:
                started = time.perf_counter()
                while iteration < config.iters_per_epoch:
                    try:
                        terms = self.iteration()
                    except FloatingPointError as exc:
                        raise DfadError(
                            f"non-finite loss at epoch {epoch + 1}, iteration {iteration + 1} ({exc}); the last good "
                            f"checkpoint {self.last_path} is kept. Lower --lr-student/--lr-generator or use --amp off."
                        ) from None
                    iteration += 1
                    now = time.perf_counter()
                    terms["seconds"], terms["iterations"], started = now - started, 1, now
                    for key, value in terms.items():
                        accumulators[key] = accumulators.get(key, 0.0) + value
                    self.elapsed_s += terms["seconds"]
                    progress.update(task, advance=1, status=self._status(terms, accumulators))
                    if stop_requested.is_set():
                        self.save_state(epoch, iteration, accumulators)
                        raise RunInterrupted(f"interrupted at epoch {epoch + 1}, iteration {iteration}; state saved to "
                                             f"{self.last_path}. Continue with: dfad-edge distill ... --out {self.out} --resume")
                self.end_epoch(epoch + 1, accumulators)
                epoch, iteration, accumulators = epoch + 1, 0, {}
                self.save_state(epoch, iteration, accumulators)
                if config.max_minutes is not None and self.elapsed_s >= 60 * config.max_minutes and epoch < config.epochs:
                    log(f"time budget of {config.max_minutes} min reached after epoch {epoch}; stopping")
                    break
        result = {"student": str(self.out / "student.pt"), "generator": str(self.out / "generator.pt"),
                  "epochs_run": epoch, "epochs": config.epochs, "best": self.best, "teacher_accuracy": self.teacher_accuracy,
                  "train_seconds": round(self.elapsed_s, 1)}
        atomic_write_json(self.out / "result.json", result)
        return result

    def _status(self, terms: dict, accumulators: dict) -> str:
        images = accumulators["iterations"] * (self.config.student_steps + 1) * self.config.batch_size
        return (f"S {terms['loss_student']:.3f} G {terms['loss_generator']:.3f} "
                f"{images / max(accumulators['seconds'], 1e-9):.0f} img/s")

    def end_epoch(self, epoch: int, accumulators: dict) -> None:
        config = self.config
        self.scheduler_s.step()
        self.scheduler_g.step()
        iterations = accumulators.pop("iterations")
        seconds = accumulators.pop("seconds")
        record = {"epoch": epoch, **{k: round(v / iterations, 5) for k, v in accumulators.items()},
                  "lr_student": self.optimizer_s.param_groups[0]["lr"], "lr_generator": self.optimizer_g.param_groups[0]["lr"],
                  "images_per_s": round(iterations * (config.student_steps + 1) * config.batch_size / seconds, 1),
                  "elapsed_s": round(self.elapsed_s, 1)}
        images, teacher_logits = self.synthetic_batch(config.diagnostic_images, seed=config.seed + 1)
        diagnostics = collapse_diagnostics(images, teacher_logits, self.num_classes)
        record["collapse"] = diagnostics
        warning = collapse_warning(diagnostics, self.num_classes)
        if warning:
            record["warning"] = warning
            log(f"[yellow]epoch {epoch}: {warning}[/]")
        self._save_samples(epoch, images, teacher_logits)
        accuracy = None
        if self.eval_source is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
            accuracy = self.evaluate(self.student, self.student_spec, "  eval")
            self.student.train()
            record["accuracy"] = accuracy
            if self.best["accuracy"] is None or accuracy["100%"] > self.best["accuracy"]["100%"]:
                self.best = {"epoch": epoch, "accuracy": accuracy}
                self.save_student_and_generator(epoch, accuracy)
            log(f"epoch {epoch}: student {accuracy['100%']:.2%} (best {self.best['accuracy']['100%']:.2%} at "
                f"epoch {self.best['epoch']}), classes {diagnostics['classes_predicted']}/{self.num_classes}, "
                f"entropy {diagnostics['class_entropy']:.2f}, diversity {diagnostics['image_diversity']:.2f}")
        elif self.eval_source is None:
            self.best = {"epoch": epoch, "accuracy": None}
            self.save_student_and_generator(epoch, None)
            log(f"epoch {epoch}: student loss {record['loss_student']:.4f}, classes {diagnostics['classes_predicted']}/"
                f"{self.num_classes}, entropy {diagnostics['class_entropy']:.2f}, diversity {diagnostics['image_diversity']:.2f}")
        record["best_epoch"] = self.best["epoch"]
        append_jsonl(self.out / "metrics.jsonl", record)

    def _save_samples(self, epoch: int, images: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        count = min(self.config.sample_images, len(images))
        names = self.teacher_checkpoint.class_names
        predicted = teacher_logits[:count].argmax(1).tolist()
        labels = [names[p] if names else str(p) for p in predicted]
        spec = self.student_spec
        save_sample_grid(images[:count], spec.mean, spec.std, labels,
                         self.out / "samples" / f"epoch_{epoch:04d}.png")
