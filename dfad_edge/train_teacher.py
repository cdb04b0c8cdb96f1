"""Supervised teacher training for users who have data but no teacher yet.

SGD with momentum and a cosine schedule, random crop (+ flip for natural images), optional label smoothing,
AMP and channels_last on CUDA. Evaluates every epoch, keeps the best checkpoint, resumes from ``last.pt``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import InputSpec, model_checkpoint, safe_torch_load
from .data import make_loader, resolve_source
from .errors import DfadError
from .evaluate import loader_accuracy
from .io import append_jsonl, atomic_torch_save, atomic_write_json
from .models import create_model, default_input_size
from .progress import log, new_progress
from .runtime import autocast, autocast_dtype, restore_rng_state, rng_state, seed_everything


@dataclass
class TeacherConfig:
    data: str
    arch: str
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    input_size: tuple[int, int] | None = None  # None: the architecture's own
    mean: list[float] | None = None  # None: the data set's statistics
    std: list[float] | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    data_dir: str | None = None
    download: bool = False
    extra: dict = field(default_factory=dict)


def _input_spec(config: TeacherConfig, source) -> InputSpec:
    height, width = config.input_size or default_input_size(config.arch)
    spec = InputSpec(source.channels, height, width, list(config.mean or source.mean), list(config.std or source.std))
    spec.validate()
    return spec


def train_teacher(config: TeacherConfig, out: Path, resume: bool = False) -> dict:
    from .runtime import resolve_device

    out = Path(out)
    last_path = out / "last.pt"
    if last_path.exists() and not resume:
        raise DfadError(f"{out} already holds a run: pass --resume to continue it, or choose a new --out")
    if resume and not last_path.exists():
        raise DfadError(f"--resume: no {last_path} to resume from")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    source = resolve_source(config.data, Path(config.data_dir) if config.data_dir else None, config.download)
    if not source.has_split("train"):
        raise DfadError(f"data source '{config.data}' has no train split; train-teacher needs DIR/train/<class>/*")
    spec = _input_spec(config, source)
    arch_kwargs = {"num_classes": source.num_classes, "in_channels": source.channels}
    model = create_model(config.arch, **arch_kwargs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    train_loader = make_loader(source, "train", spec, config.batch_size, shuffle=True, augment=True)
    test_loader = make_loader(source, "test", spec, batch_size=256)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_loader))
    amp_dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_epoch, best_accuracy = 0, -1.0
    if resume:
        state = safe_torch_load(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_epoch, best_accuracy = state["epoch"], state["best_accuracy"]
        log(f"resuming {out} at epoch {start_epoch + 1}/{config.epochs}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    atomic_write_json(out / "config.json", asdict(config))

    def save_teacher(accuracy: dict, epoch: int) -> None:
        checkpoint = model_checkpoint(model, config.arch, arch_kwargs, source.num_classes, spec, source.class_names,
                                      "train-teacher", data=config.data, epoch=epoch, test_accuracy=accuracy)
        checkpoint.save(out / "teacher.pt")

    with new_progress() as progress:
        task = progress.add_task("train-teacher", total=config.epochs * len(train_loader),
                                 completed=start_epoch * len(train_loader), status="")
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            model.train()
            total_loss, seen = 0.0, 0
            for images, labels in train_loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast(device, amp_dtype):
                    loss = criterion(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += float(loss.detach()) * len(labels)
                seen += len(labels)
                progress.update(task, advance=1, status=f"loss {total_loss / seen:.3f}")
            accuracy = loader_accuracy(model, test_loader, device, "  eval")
            is_best = accuracy["100%"] > best_accuracy
            if is_best:
                best_accuracy = accuracy["100%"]
                save_teacher(accuracy, epoch + 1)
            record = {"epoch": epoch + 1, "loss": total_loss / seen, "lr": scheduler.get_last_lr()[0],
                      "accuracy": accuracy, "seconds": round(time.perf_counter() - started, 2), "best": is_best}
            append_jsonl(out / "metrics.jsonl", record)
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch + 1,
                               "best_accuracy": best_accuracy}, last_path)
            progress.update(task, status=f"test {accuracy['100%']:.2%} (best {best_accuracy:.2%})")
    result = {"teacher": str(out / "teacher.pt"), "best_accuracy": best_accuracy, "epochs": config.epochs}
    atomic_write_json(out / "result.json", result)
    return result
