"""The dfad-edge command line: a thin layer over the pipeline stages (distill -> export -> bench)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DfadError

app = typer.Typer(
    help="Data-free adversarial distillation to small, fast models for Jetson, desktop GPUs and CPUs.\n\n"
    "Pipeline: import or train-teacher -> distill -> export -> bench. Try: dfad-edge quickstart",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)


def command(target: typer.Typer = app, name: str | None = None, **kwargs) -> Callable:
    """Register a subcommand whose DfadError becomes one clear line and exit code 2, never a traceback."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except DfadError as exc:
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]")
                raise typer.Exit(130) from None

        return target.command(name, **kwargs)(wrapper)

    return decorator


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DfadError(f"{what} must be comma-separated numbers, e.g. 0.485,0.456,0.406; got '{text}'") from None


def parse_names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DfadError(f"{what} must be comma-separated whole numbers, e.g. 1,8,64; got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise DfadError(f"{what} must be positive whole numbers; got '{text}'")
    return values


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    values = parse_ints(text.replace("x", ","), "--input-size")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def write_json_or_print(result: dict, json_path: Optional[Path]) -> None:
    if json_path is None:
        out_console.print_json(json.dumps(result))


DataOpt = typer.Option(..., "--data", help="digits, cifar10, cifar100, or an ImageFolder directory")
DataDirOpt = typer.Option(None, "--data-dir", help="where cifar10/cifar100 live (default ./data)")
DownloadOpt = typer.Option(False, "--download", help="download cifar10/cifar100 if missing (needs network)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]")


@command()
def doctor(json_out: Optional[Path] = typer.Option(None, "--json", help="also write the facts to this file")) -> None:
    """Print the environment to include in a problem report: Python, torch, CUDA/GPU, cuDNN, ONNX Runtime, TensorRT, CPU, Jetson."""
    from .env import collect_environment
    from .io import atomic_write_json

    facts = collect_environment()
    table = Table(title="dfad-edge doctor", show_header=False)
    for key, value in facts.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out_console.print(table)
    if json_out:
        atomic_write_json(json_out, facts)


@command(name="models")
def list_models_command(pattern: str = typer.Argument("*", help="glob, e.g. 'resnet*'"),
                        torchvision: bool = typer.Option(False, "--torchvision", help="also list torchvision classifiers")) -> None:
    """List the architectures create_model knows (students, teachers, generators)."""
    from .models import get_entry, list_models

    table = Table("name", "input", "description")
    for name in list_models(pattern, include_torchvision=torchvision):
        entry = get_entry(name)
        table.add_row(name, "x".join(map(str, entry.input_size)), entry.description)
    out_console.print(table)


@command(name="import")
def import_command(
    file: Path = typer.Argument(..., help="a checkpoint: raw state_dict, {'state_dict': ...}, {'model': ...}; module. prefixes ok"),
    arch: str = typer.Option(..., "--arch", help="architecture name (see dfad-edge models)"),
    mean: str = typer.Option(..., "--mean", help="per-channel normalisation mean the model was trained with, e.g. 0.485,0.456,0.406"),
    std: str = typer.Option(..., "--std", help="per-channel normalisation std, e.g. 0.229,0.224,0.225"),
    classes: Optional[str] = typer.Option(None, "--classes", help="class names in label order, comma-separated"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="default: from the classifier's weight shape"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW the model was trained at (default: the architecture's)"),
    out: Path = typer.Option(..., "--out", help="the dfad-edge checkpoint to write"),
) -> None:
    """Convert a user's checkpoint into a self-describing dfad-edge checkpoint (strict, weights_only)."""
    from .checkpoint import import_checkpoint

    checkpoint = import_checkpoint(file, arch, parse_floats(mean, "--mean"), parse_floats(std, "--std"),
                                   parse_names(classes), num_classes, parse_size(input_size))
    checkpoint.save(out)
    out_console.print(f"wrote {out}: {checkpoint.describe()}")


@command(name="eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="a dfad-edge checkpoint"),
    data: str = DataOpt, data_dir: Optional[Path] = DataDirOpt, download: bool = DownloadOpt, device: str = DeviceOpt,
    batch_size: int = typer.Option(256, "--batch-size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result as JSON to this file"),
) -> None:
    """Top-1 accuracy on the first 10%, 20% and 100% of the test set."""
    from .evaluate import evaluate_checkpoint
    from .runtime import resolve_device

    result = evaluate_checkpoint(checkpoint, data, resolve_device(device), data_dir, download, json_out, batch_size)
    table = Table("split", "images", "top-1")
    for split, accuracy in result["accuracy"].items():
        table.add_row(split, str(result["images"][split]), f"{accuracy:.2%}")
    out_console.print(table)


@command(name="train-teacher")
def train_teacher_command(
    data: str = DataOpt,
    arch: str = typer.Option(..., "--arch", help="architecture (see dfad-edge models)"),
    epochs: int = typer.Option(30, "--epochs", min=1),
    out: Path = typer.Option(..., "--out", help="run folder: teacher.pt, last.pt, metrics.jsonl, config.json"),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    lr: float = typer.Option(0.1, "--lr"),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW (default: the architecture's)"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
    data_dir: Optional[Path] = DataDirOpt, download: bool = DownloadOpt, device: str = DeviceOpt,
) -> None:
    """Train a teacher with supervised learning (SGD + cosine, crop/flip, AMP on CUDA); resumable."""
    from .train_teacher import TeacherConfig, train_teacher

    config = TeacherConfig(data=data, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                           label_smoothing=label_smoothing, input_size=parse_size(input_size), seed=seed,
                           device=device, data_dir=str(data_dir) if data_dir else None, download=download)
    result = train_teacher(config, out, resume)
    out_console.print(f"best test accuracy {result['best_accuracy']:.2%}; teacher: {result['teacher']}")


def main() -> None:
    app()
