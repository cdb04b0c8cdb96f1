"""Stage 3: accuracy, latency and size for every (model, backend, precision), student against teacher."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import ModelCheckpoint, load_checkpoint
from ..data import check_compatible, make_loader, resolve_source
from ..env import collect_environment
from ..errors import DfadError
from ..evaluate import split_accuracy, split_agreement
from ..export import ENGINE_FILES, ONNX_FILES
from ..io import atomic_write_json
from ..progress import log, track
from ..runtime import cpu_threads, resolve_device
from .backends import BackendUnavailable, InferenceBackend, OnnxRuntimeBackend, TensorRTBackend, TorchBackend
from .latency import measure_interleaved
from .size import MACS_CONVENTION, count_macs, count_parameters

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
SCHEMA = "dfad-edge-bench/1"
ACCURACY_BATCH = 64


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    device: str = "auto"
    warmup: int = 10
    iterations: int = 50
    rounds: int = 5
    threads: int | None = None  # CPU threads for PyTorch and ONNX Runtime; None = PyTorch's default
    data_dir: str | None = None

    def validate(self) -> None:
        for value, allowed, what in ((self.backends, BACKENDS, "--backends"), (self.precisions, PRECISIONS, "--precisions")):
            unknown = [v for v in value if v not in allowed]
            if unknown:
                raise DfadError(f"{what}: unknown {unknown}; choose from {', '.join(allowed)}")
        if self.iterations < 1 or self.warmup < 0 or self.rounds < 1:
            raise DfadError("--iterations and --rounds must be >= 1 and --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise DfadError("--threads must be >= 1")


@dataclass
class BenchModel:
    role: str
    checkpoint_path: Path
    checkpoint: ModelCheckpoint
    export_dir: Path | None

    def artifact(self, backend: str, precision: str, device: torch.device) -> Path | None:
        if backend == "torch":
            return self.checkpoint_path
        if self.export_dir is None:
            return None
        if backend == "tensorrt":
            return self.export_dir / ENGINE_FILES[precision]
        if precision == "int8":
            # The U8S8 graph is the fast one on x86 CPUs; the TensorRT-form QDQ graph suits GPUs.
            return self.export_dir / ONNX_FILES["int8_cpu" if device.type == "cpu" else "int8"]
        return self.export_dir / ONNX_FILES[precision]


def resolve_bench_model(role: str, path: Path) -> BenchModel:
    """A checkpoint, or an export folder (its export.json names the checkpoint it came from)."""
    path = Path(path)
    if path.is_dir():
        export_json = path / "export.json"
        if not export_json.is_file():
            raise DfadError(f"--{role} {path}: a folder must be a dfad-edge export folder (no export.json found)")
        checkpoint_path = Path(json.loads(export_json.read_text())["checkpoint"])
        if not checkpoint_path.is_absolute() and not checkpoint_path.exists():
            checkpoint_path = path / checkpoint_path
        return BenchModel(role, checkpoint_path, load_checkpoint(checkpoint_path), path)
    return BenchModel(role, path, load_checkpoint(path), None)


def make_backend(model: BenchModel, backend: str, precision: str, device: torch.device) -> InferenceBackend:
    artifact = model.artifact(backend, precision, device)
    if backend == "torch":
        return TorchBackend(model.checkpoint.build_model(), precision, device)
    if artifact is None:
        raise BackendUnavailable(f"no export folder given for the {model.role} (pass the folder dfad-edge export wrote)")
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(artifact, precision, device)
    return TensorRTBackend(artifact, precision, device)


def load_test_set(model: BenchModel, source, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split in the model's input spec, decoded once and shared by every row of that spec."""
    spec = model.checkpoint.input_spec
    key = json.dumps(vars(spec))
    if key not in cache:
        loader = make_loader(source, "test", spec, batch_size=256)
        images, labels = [], []
        for batch_images, batch_labels in track(loader, len(loader), f"load test set {spec.height}x{spec.width}"):
            images.append(batch_images.numpy())
            labels.append(batch_labels.numpy())
        cache[key] = (np.concatenate(images), np.concatenate(labels))
    return cache[key]


def predict_all(backend: InferenceBackend, images: np.ndarray, description: str) -> np.ndarray:
    batch = min(ACCURACY_BATCH, backend.max_batch or ACCURACY_BATCH)
    starts = range(0, len(images), batch)
    return np.concatenate([backend.predict(images[s:s + batch]).argmax(1) for s in track(starts, len(starts), description)])


def model_facts(model: BenchModel) -> dict:
    built = model.checkpoint.build_model()
    artifacts = {"checkpoint": model.checkpoint_path.stat().st_size}
    if model.export_dir is not None:
        for path in sorted(model.export_dir.glob("*.onnx")) + sorted(model.export_dir.glob("*.engine")):
            artifacts[path.name] = path.stat().st_size
    return {"arch": model.checkpoint.arch, "checkpoint": str(model.checkpoint_path),
            "export_dir": str(model.export_dir) if model.export_dir else None,
            "params": count_parameters(built), "macs": count_macs(built, model.checkpoint.input_spec.shape),
            "macs_convention": MACS_CONVENTION, "input_spec": vars(model.checkpoint.input_spec), "artifacts": artifacts}


def accuracy_row(model: BenchModel, backend_name: str, precision: str, device: torch.device,
                 test_set: tuple[np.ndarray, np.ndarray], references: dict[str, np.ndarray]) -> tuple[dict, InferenceBackend | None]:
    """The row's accuracy and agreement figures, and the backend for timing later (None when it cannot run here)."""
    row = {"model": model.role, "backend": backend_name, "precision": precision, "device": device.type}
    try:
        backend = make_backend(model, backend_name, precision, device)
    except BackendUnavailable as exc:
        return {**row, "skipped": str(exc)}, None
    images, labels = test_set
    predictions = torch.from_numpy(predict_all(backend, images, f"{model.role} {backend_name} {precision}"))
    accuracy, sizes = split_accuracy(predictions, torch.from_numpy(labels))
    artifact = backend.artifact or model.checkpoint_path
    row.update({
        "artifact": str(artifact), "bytes": artifact.stat().st_size,
        "provider": getattr(backend, "provider", None), "threads": backend.threads,
        "accuracy": accuracy, "images": sizes,
        "agreement": {"teacher": split_agreement(predictions, torch.from_numpy(references["teacher"])),
                      "fp32": split_agreement(predictions, torch.from_numpy(references[model.role]))},
    })
    return row, backend


def run_bench(teacher_path: Path, student_path: Path, data: str, out: Path, options: BenchOptions) -> dict:
    options.validate()
    with cpu_threads(options.threads):
        return _bench(teacher_path, student_path, data, Path(out), options)


def _bench(teacher_path: Path, student_path: Path, data: str, out: Path, options: BenchOptions) -> dict:
    from .report import write_reports

    device = resolve_device(options.device)
    models = [resolve_bench_model("teacher", teacher_path), resolve_bench_model("student", student_path)]
    source = resolve_source(data, Path(options.data_dir) if options.data_dir else None)
    for model in models:
        check_compatible(source, model.checkpoint.input_spec, model.checkpoint.num_classes, model.checkpoint.class_names)
    if models[0].checkpoint.num_classes != models[1].checkpoint.num_classes:
        raise DfadError("teacher and student have different class counts; they cannot be compared")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    test_sets = {m.role: load_test_set(m, source, cache) for m in models}
    # Reference predictions: each model in PyTorch FP32 on this device (for "agreement with FP32" and "with the teacher").
    references = {m.role: predict_all(TorchBackend(m.checkpoint.build_model(), "fp32", device), test_sets[m.role][0],
                                      f"{m.role} reference") for m in models}
    results, timed = [], {}
    for model in models:
        for backend_name in options.backends:
            for precision in options.precisions:
                row, backend = accuracy_row(model, backend_name, precision, device, test_sets[model.role], references)
                if backend is None:
                    log(f"skip {model.role} {backend_name} {precision}: {row['skipped']}")
                else:
                    timed[len(results)] = (backend, model.checkpoint.input_spec.shape)
                results.append(row)
    log(f"timing {len(timed)} rows in interleaved rounds")
    latencies = measure_interleaved({str(i): entry for i, entry in timed.items()}, options.batch_sizes,
                                    options.iterations, options.warmup, options.rounds)
    for index, (backend, _shape) in timed.items():
        results[index].update(latencies[str(index)])
        results[index]["peak_device_memory_bytes"] = backend.peak_device_memory_bytes()
    report = {"schema": SCHEMA, "env": collect_environment(), "data": data, "settings": asdict(options),
              "models": {m.role: model_facts(m) for m in models}, "results": results}
    atomic_write_json(out / "report.json", report)
    write_reports(report, out)
    return report
