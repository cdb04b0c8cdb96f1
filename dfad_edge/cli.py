"""The dfad-edge command line: a thin layer over the pipeline stages (distill -> export -> bench)."""

from __future__ import annotations

import functools
from contextlib import contextmanager
import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import DfadError

app = typer.Typer(
    help="Data-free adversarial distillation to small, fast models for Jetson, desktop GPUs and CPUs.\n\n"
    "Pipeline: import or train-teacher -> distill -> export -> bench. Try: dfad-edge quickstart",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors():
    """A DfadError or a file-system error becomes one clear line and exit code 2, never a traceback; Ctrl-C exits
    with 130."""
    try:
        yield
    except DfadError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.user_message())}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        # The file system said no (a path under a regular file, no permission, disk full): the user can fix that.
        where = f": {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {escape((exc.strerror or str(exc)) + where)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def command(target: typer.Typer = app, name: str | None = None, **kwargs) -> Callable:
    """Register a subcommand that reports errors through user_errors()."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            with user_errors():
                return fn(*args, **kw)

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


@command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="the teacher: a dfad-edge checkpoint (see import/train-teacher)"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    preset: str = typer.Option("auto", "--preset", help="cifar100 (the paper's recipe), cifar10, digits; auto: from the teacher"),
    student: Optional[str] = typer.Option(None, "--student", help="student architecture (default: the preset's)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="evaluate on this test set each epoch and keep the best"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    iters_per_epoch: Optional[int] = typer.Option(None, "--iters-per-epoch", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    student_steps: Optional[int] = typer.Option(None, "--student-steps", min=1, help="student steps per generator step"),
    nz: Optional[int] = typer.Option(None, "--nz", min=1, help="generator latent size"),
    lr_student: Optional[float] = typer.Option(None, "--lr-student"),
    lr_generator: Optional[float] = typer.Option(None, "--lr-generator"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="multistep | cosine | step (stepped per epoch)"),
    milestones: Optional[str] = typer.Option(None, "--milestones", help="epochs where multistep drops the LR, e.g. 100,200"),
    loss: Optional[str] = typer.Option(None, "--loss", help="student loss: l1 (paper), kl, mse"),
    bn_stats: Optional[float] = typer.Option(None, "--bn-stats", help="weight of BatchNorm-statistics matching (0 = off)"),
    class_balance: Optional[float] = typer.Option(None, "--class-balance", help="weight of the class-balance term (0 = off)"),
    replay: Optional[int] = typer.Option(None, "--replay", help="images kept in the replay memory (0 = off)"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop cleanly after this much training time"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1),
    seed: Optional[int] = typer.Option(None, "--seed"),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto | off | bf16 | fp16"),
    compile_models: bool = typer.Option(False, "--compile", help="torch.compile student and teacher (CUDA)"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="memory format (default on)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out exactly where it stopped"),
    data_dir: Optional[Path] = DataDirOpt, download: bool = DownloadOpt, device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Data-free adversarial distillation: a generator searches for images where student and teacher disagree."""
    from .checkpoint import load_checkpoint
    from .distill import DistillConfig, DistillRun, preset_config

    if resume:
        config = DistillConfig()  # replaced by the config saved in --out
        err_console.print(f"resuming with the configuration saved in {out}; other distill options are ignored")
    else:
        chosen = preset if preset != "auto" else _preset_for(load_checkpoint(teacher))
        overrides = dict(student_arch=student, epochs=epochs, iters_per_epoch=iters_per_epoch, batch_size=batch_size,
                         student_steps=student_steps, nz=nz, lr_student=lr_student, lr_generator=lr_generator,
                         scheduler=scheduler, replay_size=replay, max_minutes=max_minutes, eval_every=eval_every,
                         seed=seed, amp=amp, device=device, compile=compile_models or None, channels_last=channels_last,
                         milestones=tuple(parse_ints(milestones, "--milestones")) if milestones else None)
        loss_overrides = {k: v for k, v in dict(student=loss, bn_stats=bn_stats, class_balance=class_balance).items()
                          if v is not None}
        config = preset_config(chosen, **overrides, **loss_overrides)
    result = DistillRun(config, teacher, out, eval_data, data_dir, download, resume).run()
    best = result["best"]
    if best["accuracy"]:
        out_console.print(f"best student top-1 {best['accuracy']['100%']:.2%} at epoch {best['epoch']}"
                          + (f" (teacher {result['teacher_accuracy']['100%']:.2%})" if result["teacher_accuracy"] else ""))
    out_console.print(f"student: {result['student']}  generator: {result['generator']}")


def _preset_for(teacher) -> str:
    if teacher.input_spec.height <= 8:
        return "digits"
    return "cifar10" if teacher.num_classes <= 10 else "cifar100"


@command()
def export(
    checkpoint: Path = typer.Argument(..., help="a dfad-edge checkpoint (student.pt, teacher.pt, ...)"),
    out: Path = typer.Option(..., "--out", help="folder for model.onnx, model.int8.onnx, engines, export.json"),
    int8: bool = typer.Option(False, "--int8", help="INT8 QDQ graphs: TensorRT flavour and ONNX Runtime CPU flavour"),
    fp16: bool = typer.Option(False, "--fp16", help="an FP16-typed ONNX graph (FP32 at the boundary)"),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="build TensorRT engines from each graph (needs TensorRT + GPU)"),
    calib: str = typer.Option("generator", "--calib", help="'generator' (data-free, default) or a data source of real images"),
    calib_images: int = typer.Option(512, "--calib-images", min=1),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | entropy | percentile"),
    generator: Optional[Path] = typer.Option(None, "--generator", help="generator.pt (default: next to the checkpoint)"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="largest batch the graphs and engines are verified/built for"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Export to ONNX, verify against PyTorch, optionally INT8 (data-free calibration), FP16 and TensorRT engines."""
    from .export import ExportOptions, run_export

    options = ExportOptions(int8=int8, fp16=fp16, tensorrt=tensorrt, calib=calib, calib_images=calib_images,
                            calib_method=calib_method, generator=str(generator) if generator else None,
                            max_batch=max_batch, data_dir=str(data_dir) if data_dir else None)
    report = run_export(checkpoint, out, options)
    table = Table("artifact", "bytes", "check")
    for key, artifact in report["artifacts"].items():
        if "verification" in artifact and artifact["verification"]:
            check = "max |diff| {:.2e} vs PyTorch".format(max(v["max_abs_diff"] for v in artifact["verification"].values()))
        else:
            check = "top-1 agreement with FP32 {:.2%}".format(artifact["agreement_with_fp32"]["top1_agreement"])
        table.add_row(artifact["path"], f"{artifact['bytes']:,}", check)
    for engine in (report.get("engines") or {}).values():
        table.add_row(engine["path"], f"{engine['bytes']:,}", f"TensorRT {engine['tensorrt_version']}, {engine['gpu_name']}")
    out_console.print(table)
    out_console.print(f"wrote {out / 'export.json'}")


bench_app = typer.Typer(help="Accuracy, latency and size, student against teacher, for every backend and precision.",
                        invoke_without_command=True, no_args_is_help=False)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="teacher checkpoint or its export folder"),
    student: Optional[Path] = typer.Option(None, "--student", help="student checkpoint or its export folder"),
    data: Optional[str] = typer.Option(None, "--data", help="test data: digits, cifar10, cifar100, or an ImageFolder directory"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for report.json, report.md, tradeoff.png"),
    backends: str = typer.Option("torch,onnxruntime,tensorrt", "--backends"),
    precisions: str = typer.Option("fp32,fp16,int8", "--precisions"),
    batch_sizes: str = typer.Option("1,8,64", "--batch-sizes"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    warmup: int = typer.Option(10, "--warmup", min=0),
    iterations: int = typer.Option(50, "--iterations", min=1),
    rounds: int = typer.Option(5, "--rounds", min=1,
                               help="split the timed iterations into this many interleaved rounds (drift estimate)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch and ONNX Runtime "
                                          "(default: PyTorch's, usually the core count)"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Bench teacher and student: top-1 on 10/20/100% splits, latency percentiles, throughput, size. Writes
    report.json, report.md and tradeoff.png. Rows that cannot run here are kept with the reason."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        _run_bench(teacher, student, data, out, backends, precisions, batch_sizes, device, warmup, iterations, rounds,
                   threads, data_dir)


def _run_bench(teacher, student, data, out, backends, precisions, batch_sizes, device, warmup, iterations, rounds,
               threads, data_dir) -> None:
    from .bench import BenchOptions, run_bench

    missing = [flag for flag, value in (("--teacher", teacher), ("--student", student), ("--data", data), ("--out", out))
               if value is None]
    if missing:
        raise DfadError(f"bench needs {', '.join(missing)} (see dfad-edge bench --help)")
    options = BenchOptions(backends=parse_names(backends), precisions=parse_names(precisions),
                           batch_sizes=parse_ints(batch_sizes, "--batch-sizes"), device=device, warmup=warmup,
                           iterations=iterations, rounds=rounds, threads=threads, data_dir=str(data_dir) if data_dir else None)
    run_bench(teacher, student, data, out, options)
    out_console.print((out / "report.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'tradeoff.png'}")


@command(target=bench_app, name="compare")
def bench_compare(first: Path = typer.Argument(..., help="A/report.json"), second: Path = typer.Argument(..., help="B/report.json"),
                  out: Optional[Path] = typer.Option(None, "--out", help="also write the comparison as Markdown")) -> None:
    """The same rows of two reports side by side (e.g. desktop against Jetson, before/after a change)."""
    from .bench.report import compare_reports, load_report
    from .io import atomic_write_text

    text = compare_reports(load_report(first), load_report(second), str(first), str(second))
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)
    if out:
        atomic_write_text(out, text)


@command()
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), "--out", help="where everything is written"),
               seed: int = typer.Option(0, "--seed"), device: str = DeviceOpt,
               force: bool = typer.Option(False, "--force", help="replace an existing --out")) -> None:
    """The whole pipeline on built-in digits (no download, a few minutes on a CPU): teacher, data-free distillation,
    ONNX/FP16/INT8 export, bench, and the student-vs-teacher table."""
    from .quickstart import run_quickstart

    summary = run_quickstart(out, seed, device, force)
    out_console.print(Path(summary["report"]).read_text(), markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"student keeps {summary['kept']:.1%} of the teacher's accuracy "
                      f"({summary['student_accuracy']:.2%} vs {summary['teacher_accuracy']:.2%}), with no training data.")
    out_console.print(f"files: {out}/teacher, {out}/distill (run folder), {out}/export-student, {out}/export-teacher, "
                      f"{out}/bench (report.md, report.json, tradeoff.png)")
