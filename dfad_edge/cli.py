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


SIZED_LISTING = 25  # params and MACs are computed for listings up to this long (building every model takes a while)


@command(name="models")
def list_models_command(pattern: str = typer.Argument("*", help="glob, e.g. 'resnet*' or 'mobilenet*'"),
                        torchvision: bool = typer.Option(False, "--torchvision", help="also list torchvision classifiers"),
                        timm: bool = typer.Option(False, "--timm", help="also list timm models (needs dfad-edge[timm])"),
                        num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1, help="count parameters "
                                                                  "and MACs for this many classes (default: each "
                                                                  "architecture's own: 10 here, 1000 in torchvision/timm)")) -> None:
    """List the architectures (students, teachers, generators) with parameters and MACs at each one's input size, to
    pick a student by budget. Edge students: mobilenetv2_cifar(_050) and resnet18_8x for 32x32 teachers; for 224x224
    teachers the mobile models of torchvision and timm (e.g. torchvision.mobilenet_v3_small, timm.mobilenetv4_conv_small).
    Use them as --arch torchvision.NAME / timm.NAME."""
    from .bench.size import architecture_size
    from .models import get_entry, list_models

    names = list_models(pattern, include_torchvision=torchvision, include_timm=timm)
    sized = len(names) <= SIZED_LISTING
    table = Table("name", "input", "params", "MACs", "description")
    for name in names:
        entry = get_entry(name)
        params, macs = architecture_size(name, num_classes) if sized else (None, None)
        table.add_row(name, "x".join(map(str, entry.input_size)), f"{params / 1e6:.2f} M" if params else "",
                      f"{macs / 1e6:,.1f} M" if macs else "", entry.description)
    out_console.print(table)
    if not sized:
        out_console.print(f"{len(names)} models: params and MACs are shown for up to {SIZED_LISTING}; narrow the list "
                          "with a pattern, e.g. dfad-edge models --timm 'mobilenet*'")


@command(name="import")
def import_command(
    file: Path = typer.Argument(..., help="a checkpoint: raw state_dict, {'state_dict': ...}, {'model': ...}; module. prefixes ok"),
    arch: str = typer.Option(..., "--arch", help="architecture name (see dfad-edge models): dfad-edge's, "
                             "torchvision.NAME or timm.NAME"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel normalisation mean the model was trained with, "
                                       "e.g. 0.485,0.456,0.406 (default for torchvision/timm: their pretrained config's)"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel normalisation std, e.g. 0.229,0.224,0.225"),
    classes: Optional[str] = typer.Option(None, "--classes", help="class names in label order, comma-separated"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="default: from the classifier's weight shape"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW the model was trained at (default: the architecture's)"),
    transform: Optional[str] = typer.Option(None, "--transform", help="how test images are fitted to the input: "
                                            "stretch (CIFAR-style) or center_crop (ImageNet-style); default: center_crop "
                                            "above 64x64, else stretch"),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", min=0.01, max=1.0, help="with center_crop: the share of "
                                             "the resized image kept, e.g. 0.875 = resize to 256, crop 224 (default: the "
                                             "pretrained config's, else 0.875)"),
    out: Path = typer.Option(..., "--out", help="the dfad-edge checkpoint to write"),
) -> None:
    """Convert a user's checkpoint into a self-describing dfad-edge checkpoint (strict, weights_only). For torchvision
    and timm architectures, what is not given is taken from the model's pretrained config (and said so)."""
    from .checkpoint import import_checkpoint

    checkpoint = import_checkpoint(file, arch, parse_floats(mean, "--mean"), parse_floats(std, "--std"),
                                   parse_names(classes), num_classes, parse_size(input_size), transform, crop_pct)
    checkpoint.save(out)
    defaulted = checkpoint.provenance.get("from_pretrained_config")
    if defaulted:
        out_console.print(f"from {arch}'s pretrained config (pass the option to override): {'; '.join(defaulted)}",
                          soft_wrap=True)
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
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture (see dfad-edge models); default: digits_cnn "
                                       "for digits, resnet56 for cifar10, resnet34_8x for cifar100, and for an "
                                       "ImageFolder one for its image size"),
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
    """Train a teacher with supervised learning (SGD + cosine, crop/flip, AMP); resumable. Ships the last epoch: the
    test set is evaluated each epoch but never used to choose. Under torchrun (torchrun --nproc-per-node N -m dfad_edge
    train-teacher ...) N ranks share each batch of --batch-size."""
    from .distributed import is_main, torchrun_process_group
    from .train_teacher import TeacherConfig, train_teacher

    config = TeacherConfig(data=data, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                           label_smoothing=label_smoothing, input_size=parse_size(input_size), seed=seed,
                           device=device, data_dir=str(data_dir) if data_dir else None, download=download)
    with torchrun_process_group(device):
        result = train_teacher(config, out, resume)
        if not is_main():
            return
    if result["arch_note"]:
        out_console.print(result["arch_note"])
    out_console.print(f"teacher {result['arch']} (last epoch) test accuracy {result['test_accuracy']['100%']:.2%}: "
                      f"{result['teacher']}")


def main() -> None:
    app()


def parse_budget(text: str | None) -> float | None:
    """'30m', '2h', '1h30m', '90s' or a plain number of minutes -> minutes."""
    if text is None:
        return None
    import re

    compact = text.strip().lower().replace(" ", "")
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", compact)
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):
        minutes = float(compact)
    elif parts and compact:
        hours, mins, secs = (float(group) if group else 0.0 for group in parts.groups())
        minutes = 60 * hours + mins + secs / 60
    else:
        raise DfadError(f"--budget {text}: use a duration such as 30m, 2h, 1h30m or 90s")
    if minutes <= 0:
        raise DfadError(f"--budget {text}: must be longer than zero")
    return minutes


def _distill_epilog() -> str:
    from .distill import options_reference

    return "\b\n" + options_reference().replace("\n\n", "\n\n\b\n")


@command(epilog=_distill_epilog())
def distill(
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="the teacher: a dfad-edge checkpoint (see import/train-teacher)"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    method: str = typer.Option("auto", "--method", help="dfad (the published DFAD recipe, with remedies in its "
                               "presets), pool (synthesis into a pool of reused images) or prior (augmented crops of "
                               "photographs, --images); auto: the one measured best for the teacher's kind of data"),
    preset: str = typer.Option("auto", "--preset", help="a named configuration of the method (dfad: cifar100 = the paper's "
                               "recipe, cifar10, small, tiny, large; pool and prior: small, tiny, large); auto: the best measured for "
                               "the teacher's kind of data, from its input size"),
    student: Optional[str] = typer.Option(None, "--student", help="student architecture (default: the preset's)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="train for this long (30m, 2h, ...); the schedule is "
                                         "planned to end then (evaluation and checkpoint writes not counted)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="also evaluate on this test set each epoch; observed "
                                            "only, never used to choose the student"),
    images: Optional[str] = typer.Option(None, "--images", help="method prior: learn on crops of these unlabeled images "
                                         "(a file, a folder or a quoted glob; labels and folder names are ignored) "
                                         "instead of the built-in photographs"),
    set_options: Optional[list[str]] = typer.Option(None, "--set", help="override any option, key=value (listed below); "
                                                    "repeatable"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="start from a config.json of an earlier run"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto | off | bf16 | fp16"),
    compile_models: bool = typer.Option(False, "--compile", help="torch.compile student and teacher"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out exactly where it stopped"),
    data_dir: Optional[Path] = DataDirOpt, download: bool = DownloadOpt, device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Data-free distillation: synthesise images the teacher recognises and teach the student to agree with it on them.
    No real data is used; --eval-data only observes. The student that ships (student.pt) is the last epoch's
    (its weight average with --set average_epochs=N).
    Under torchrun (torchrun --nproc-per-node N -m dfad_edge distill ...) N ranks share every batch."""
    from .distill import DistillRun
    from .distributed import is_main, torchrun_process_group

    if resume:
        err_console.print(f"resuming with the configuration saved in {out}; other distill options are ignored")
        saved = _saved_run_config(out)
        config, teacher_path, device_name = None, Path(saved["teacher"]), saved["device"]
        eval_data = eval_data or saved.get("eval_data")  # the resumed run goes on observing what it observed
        data_dir = data_dir or (Path(saved["data_dir"]) if saved.get("data_dir") else None)
    else:
        if teacher is None:
            raise DfadError("distill needs --teacher (a dfad-edge checkpoint; see dfad-edge import / train-teacher)")
        config = _distill_config(teacher, method, preset, config_file, student, budget, seed, amp, compile_models, device,
                                 set_options or [], images)
        teacher_path, device_name = teacher, config.device
    with torchrun_process_group(device_name):
        result = DistillRun(config, teacher_path, out, eval_data, data_dir, download, resume).run()
        if not is_main():
            return
    shipped = result["shipped"]
    if shipped["test_accuracy"]:
        out_console.print(f"student (epoch {shipped['epoch']}, the last) top-1 {shipped['test_accuracy']['100%']:.2%}"
                          + (f" (teacher {result['teacher_accuracy']['100%']:.2%})" if result["teacher_accuracy"] else ""))
    out_console.print(f"student: {result['student']}  synthetic images: {result['synthetic']}")


def _distill_config(teacher: Path, method: str, preset: str, config_file: Optional[Path], student, budget, seed, amp,
                    compile_models: bool, device, assignments: list[str], images: Optional[str] = None):
    from dataclasses import replace

    from .checkpoint import load_checkpoint
    from .distill import DistillConfig, apply_overrides, preset_config, teacher_kind

    if config_file is not None:
        try:
            config = DistillConfig.from_dict(json.loads(config_file.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DfadError(f"--config {config_file}: cannot read it ({exc})") from None
    else:
        if images is not None and method not in ("auto", "prior"):
            raise DfadError(f"--images is the prior method's source; --method {method} learns from its generator alone. "
                            "Use --method prior (or auto)")
        config = preset_config("prior" if images is not None else method, preset,
                               teacher_kind(load_checkpoint(teacher).input_spec.height))
    if images is not None:
        if config.method != "prior":
            raise DfadError(f"--images is the prior method's source; the configuration in --config is method {config.method}")
        config = replace(config, options=replace(config.options, images=images))
    flags = {"student_arch": student, "budget_minutes": parse_budget(budget), "seed": seed, "amp": amp,
             "compile": compile_models or None, "device": device}
    config = replace(config, **{key: value for key, value in flags.items() if value is not None})
    config = apply_overrides(config, assignments)
    config.validate()
    return config


def _saved_run_config(out: Path) -> dict:
    config = out / "config.json"
    if not config.is_file():
        raise DfadError(f"--resume: {out} holds no run (no config.json)")
    return json.loads(config.read_text())


@command()
def export(
    checkpoint: Path = typer.Argument(..., help="a dfad-edge checkpoint (student.pt, teacher.pt, ...)"),
    out: Path = typer.Option(..., "--out", help="folder for model.onnx, model.int8.onnx, engines, export.json"),
    int8: bool = typer.Option(False, "--int8", help="INT8 QDQ graphs: TensorRT flavour and ONNX Runtime CPU flavour"),
    fp16: bool = typer.Option(False, "--fp16", help="an FP16-typed ONNX graph (FP32 at the boundary)"),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="build TensorRT engines from each graph (needs TensorRT + GPU)"),
    calib: str = typer.Option("synthetic", "--calib", help="'synthetic' (data-free: the images distill made, default) or "
                              "a data source of real images"),
    calib_images: int = typer.Option(512, "--calib-images", min=1),
    calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | entropy | percentile"),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="synthetic.pt of the distillation run (default: "
                                             "next to the checkpoint)"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="largest batch the graphs and engines are verified/built for"),
    int8_quantizer: str = typer.Option("ort", "--int8-quantizer", help="who makes the TensorRT INT8 graph: ort (ONNX "
                                       "Runtime + NVIDIA's Q/DQ placement) or modelopt (needs dfad-edge[modelopt])"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="with --tensorrt: one engine profile tuned "
                                              "for each batch size bench will time (default: bench's)"),
    device: str = typer.Option("auto", "--device", help="with --tensorrt: the GPU to build engines on, cuda[:N]"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Export to ONNX, verify against PyTorch, optionally INT8 (data-free calibration), FP16 and TensorRT engines."""
    from .export import ExportOptions, run_export

    options = ExportOptions(int8=int8, fp16=fp16, tensorrt=tensorrt, calib=calib, calib_images=calib_images,
                            calib_method=calib_method, synthetic=str(synthetic) if synthetic else None,
                            max_batch=max_batch, data_dir=str(data_dir) if data_dir else None,
                            int8_quantizer=int8_quantizer, device=device,
                            **({"batch_sizes": parse_ints(batch_sizes, "--batch-sizes")} if batch_sizes else {}))
    report = run_export(checkpoint, out, options)
    table = Table("artifact", "bytes", "check")
    for key, artifact in report["artifacts"].items():
        if "verification" in artifact and artifact["verification"]:
            check = "max |diff| {:.2e} vs PyTorch".format(max(v["max_abs_diff"] for v in artifact["verification"].values()))
        else:
            check = "top-1 agreement with FP32 {:.2%}".format(artifact["agreement_with_fp32"]["top1_agreement"])
        table.add_row(artifact["path"], f"{artifact['bytes']:,}", check)
    _add_engine_rows(table, report.get("engines") or {})
    out_console.print(table)
    out_console.print(f"wrote {out / 'export.json'}")


def _add_engine_rows(table: Table, engines: dict) -> None:
    for engine in engines.values():
        tuned = ", ".join(str(profile["opt"]) for profile in engine["profiles"])
        table.add_row(engine["path"], f"{engine['bytes']:,}",
                      f"TensorRT {engine['tensorrt_version']}, {engine['gpu_name']}, tuned for batch {tuned}")


@command(name="build-engines")
def build_engines_command(
    folder: Path = typer.Argument(..., help="an export folder (its ONNX files are all it needs; copy it to the device)"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="one optimisation profile tuned for each "
                                              "batch size bench will time (default: bench's)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="largest batch the engines take (default: "
                                            "export's --max-batch, from the ONNX metadata)"),
    device: str = typer.Option("auto", "--device", help="the GPU to build on, cuda[:N]"),
) -> None:
    """Build TensorRT engines on this machine (a Jetson, a desktop GPU) from an export folder's ONNX files alone: no
    checkpoint, calibration images or ONNX Runtime needed. Engines only run on the GPU and TensorRT version that built
    them, so build them where they run."""
    from .export.tensorrt_build import BENCH_BATCH_SIZES, build_engines
    from .runtime import resolve_device

    sizes = parse_ints(batch_sizes, "--batch-sizes") if batch_sizes else list(BENCH_BATCH_SIZES)
    engines = build_engines(folder, sizes, max_batch, resolve_device(device))
    table = Table("engine", "bytes", "built with")
    _add_engine_rows(table, engines)
    out_console.print(table)


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
    out_console.print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'tradeoff.png'}, {out / 'confusion.png'}")


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
                      f"{out}/bench (report.md, report.json, tradeoff.png, confusion.png)")
