"""Supervised teacher training for users who have data but no teacher yet.

SGD with momentum and a cosine schedule, random crop (+ flip for natural images), optional label smoothing,
AMP and channels_last on CUDA. Ships the last epoch (the cosine schedule ends at a learning rate of ~0): the test set is
only observed, every epoch, never used to pick the teacher. Resumes from ``last.pt``.

Under torchrun the ranks share each batch of ``batch_size`` (DistributedSampler, DDP, SyncBatchNorm: the batch means
what it means in one process); rank 0 evaluates and writes the run folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import SMALL_IMAGE_LIMIT, InputSpec, model_checkpoint, safe_torch_load
from .data import make_loader, resolve_source
from .distributed import (data_parallel, gather_to_main, host_floats_summed, is_distributed, is_main, local_main_first,
                          local_rank, rank, rank_device, rank_share, refuse_another_world_size, shard_loader,
                          shuffle_for_epoch, world_size)
from .errors import DfadError
from .evaluate import loader_accuracy
from .io import append_jsonl, atomic_torch_save, atomic_write_json
from .models import build_kwargs, create_model, default_input_size
from .progress import log, new_progress
from .runtime import autocast, autocast_dtype, grad_scaler, restore_rng_state, rng_state, seed_everything


@dataclass
class TeacherConfig:
    data: str
    arch: str | None = None  # None: a sensible default for the data (default_teacher_arch)
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


def default_teacher_arch(data: str, image_size: tuple[int, int]) -> tuple[str, str]:
    """The architecture to train when --arch is not given, and why: the known data sets' usual teachers, else one for
    the images' size."""
    known = {"digits": ("digits_cnn", "the small CNN for 8x8 digits"),
             "cifar10": ("resnet56", "the classic CIFAR-10 ResNet"),
             "cifar100": ("resnet34_8x", "DFAD's CIFAR-100 teacher, a ResNet-34 for 32x32 images")}
    if data in known:
        return known[data]
    height, width = image_size
    if max(height, width) <= 16:
        return "digits_cnn", f"a small CNN for {height}x{width} images"
    if max(height, width) <= SMALL_IMAGE_LIMIT:
        return "resnet56", f"a CIFAR ResNet for {height}x{width} images"
    return "torchvision.resnet18", f"an ImageNet-style ResNet-18 for {height}x{width} images (trained at 224x224)"


def _with_arch(config: TeacherConfig, source) -> tuple[TeacherConfig, str | None]:
    """The config with an architecture, and a line saying which was picked when --arch was not given."""
    if config.arch is not None:
        return config, None
    # ImageFolder images vary in size: the first test image stands for the set.
    image_size = source.natural_size or tuple(source.dataset("test")[0][0].shape[-2:])
    arch, reason = default_teacher_arch(config.data, image_size)
    return replace(config, arch=arch), f"--arch not given: training {arch}, {reason}"


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
    device = rank_device(resolve_device(config.device))
    seed_everything(config.seed)
    with local_main_first():  # one rank per machine downloads; the others then find the files
        source = resolve_source(config.data, Path(config.data_dir) if config.data_dir else None,
                                config.download and local_rank() == 0)
    if not source.has_split("train"):
        raise DfadError(f"data source '{config.data}' has no train split; train-teacher needs DIR/train/<class>/*")
    config, arch_note = _with_arch(config, source)
    if arch_note:
        log(arch_note)
    spec = _input_spec(config, source)
    arch_kwargs = build_kwargs(config.arch, source.num_classes, source.channels, (spec.height, spec.width))
    model = create_model(config.arch, **arch_kwargs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = data_parallel(model, device)
    rank_seeds = [config.seed + index for index in range(world_size())]
    if is_distributed():
        # Every rank built the same model from the run's seed (DDP requires it); each now draws its own augmentations.
        seed_everything(rank_seeds[rank()])

    train_loader = shard_loader(make_loader(source, "train", spec, rank_share(config.batch_size, "--batch-size"),
                                            shuffle=True, augment=True), config.seed)
    test_loader = make_loader(source, "test", spec, batch_size=256)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_loader))
    amp_dtype = autocast_dtype(device, config.amp)
    scaler = grad_scaler(device, amp_dtype)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_epoch, accuracy = 0, None
    if resume:
        state = safe_torch_load(last_path)
        refuse_another_world_size(state.get("world_size", 1), last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"] if is_main() else state["other_ranks_rng"][rank() - 1], device)
        start_epoch, accuracy = state["epoch"], state["accuracy"]
        log(f"resuming {out} at epoch {start_epoch + 1}/{config.epochs}")
    elif is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if is_main():
        atomic_write_json(out / "config.json", {**asdict(config), "world_size": world_size(), "rank_seeds": rank_seeds})

    with new_progress() as progress:
        task = progress.add_task("train-teacher", total=config.epochs * len(train_loader),
                                 completed=start_epoch * len(train_loader), status="")
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            shuffle_for_epoch(train_loader, epoch)
            model.train()
            total_loss, seen = 0.0, 0
            for images, labels in train_loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast(device, amp_dtype):
                    loss = criterion(forward(images), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += float(loss.detach()) * len(labels)
                seen += len(labels)
                progress.update(task, advance=1, status=f"loss {total_loss / seen:.3f}")
            total_loss, seen = host_floats_summed([total_loss, seen], device)  # every rank's batches
            rngs = gather_to_main(rng_state(device))
            if not is_main():  # rank 0 evaluates and writes; the others wait for it in the next epoch's first step
                continue
            lr = scheduler.get_last_lr()[0]
            accuracy = loader_accuracy(model, test_loader, device, "  eval")
            model_checkpoint(model, config.arch, arch_kwargs, source.num_classes, spec, source.class_names,
                             "train-teacher", data=config.data, epoch=epoch + 1).save(out / "teacher.pt")
            append_jsonl(out / "metrics.jsonl", {"epoch": epoch + 1, "loss": total_loss / seen, "lr": lr,
                                                 "accuracy": accuracy, "seconds": round(time.perf_counter() - started, 2)})
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs[0],
                               "other_ranks_rng": rngs[1:], "world_size": world_size(), "epoch": epoch + 1,
                               "accuracy": accuracy}, last_path)
            progress.update(task, status=f"test {accuracy['100%']:.2%}")
    result = {"teacher": str(out / "teacher.pt"), "arch": config.arch, "arch_note": arch_note, "epochs": config.epochs,
              "test_accuracy": accuracy, "shipped": "last epoch (the test set is never used to choose)"}
    if is_main():
        atomic_write_json(out / "result.json", result)
    return result
