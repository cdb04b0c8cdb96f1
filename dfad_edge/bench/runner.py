"""Stage 3: accuracy, latency and size for every (model, backend, precision), student against teacher."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import ModelCheckpoint, load_checkpoint
from ..data import DataSource, check_compatible, make_loader, resolve_source
from ..env import collect_environment
from ..errors import DfadError
from ..evaluate import confusion_matrix, per_class_accuracy, split_accuracy, split_agreement, split_top_k_accuracy
from ..export import CHECKPOINT_FILE, ENGINE_FILES, ONNX_FILES
from ..export.folder import described_model, read_export_json
from ..export.tensorrt_build import BENCH_BATCH_SIZES
from ..models import create_model
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
TOP_K = 5  # reported besides top-1 where the data set has more than 10 classes


@dataclass
class BenchOptions:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    batch_sizes: list[int] = field(default_factory=lambda: list(BENCH_BATCH_SIZES))
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
    checkpoint_path: Path | None  # None: an export folder copied without its checkpoint.pt (no PyTorch rows)
    checkpoint: ModelCheckpoint  # without weights when checkpoint_path is None (from model.onnx's metadata)
    export_dir: Path | None

    def architecture(self) -> torch.nn.Module:
        """The model for parameter and MAC counts, which do not depend on the weights."""
        if self.checkpoint_path is None:
            return create_model(self.checkpoint.arch, **self.checkpoint.arch_kwargs).eval()
        return self.checkpoint.build_model()

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
    """A checkpoint, or an export folder: its export.json names the checkpoint copy inside it, relative to the folder,
    so a folder copied to another machine works there. Without that copy, model.onnx's metadata describes the model."""
    path = Path(path)
    if path.is_dir():
        checkpoint_path = path / read_export_json(path)["checkpoint"]
        if checkpoint_path.is_file():
            return BenchModel(role, checkpoint_path, load_checkpoint(checkpoint_path), path)
        log(f"[yellow]{path}: no {checkpoint_path.name} in the folder; the model is described by its model.onnx and "
            "the PyTorch rows are skipped[/]")
        return BenchModel(role, None, described_model(path), path)
    return BenchModel(role, path, load_checkpoint(path), None)


def make_backend(model: BenchModel, backend: str, precision: str, device: torch.device) -> InferenceBackend:
    artifact = model.artifact(backend, precision, device)
    if backend == "torch":
        if model.checkpoint_path is None:
            raise BackendUnavailable(f"the export folder has no {CHECKPOINT_FILE} (copy it along for PyTorch rows)")
        return TorchBackend(model.checkpoint.build_model(), precision, device)
    if artifact is None:
        raise BackendUnavailable(f"no export folder given for the {model.role} (pass the folder dfad-edge export wrote)")
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(artifact, precision, device)
    return TensorRTBackend(artifact, precision, device)


def stream_predictions(backend: InferenceBackend, model: BenchModel, source: DataSource,
                       description: str) -> tuple[np.ndarray, np.ndarray]:
    """Each test image's best classes (N x k, best first: k = 5 with more than 10 classes, else 1) and its label. The
    test set streams through a loader a batch at a time, so it never has to fit in memory (ImageNet on a Jetson)."""
    batch = min(ACCURACY_BATCH, backend.max_batch or ACCURACY_BATCH)
    loader = make_loader(source, "test", model.checkpoint.input_spec, batch_size=batch)
    k = TOP_K if model.checkpoint.num_classes > 10 else 1
    best, labels = [], []
    for images, batch_labels in track(loader, len(loader), description):
        # A stable sort ranks tied logits by class index, as argmax does, so the first column is argmax exactly.
        best.append(np.argsort(-backend.predict(images.numpy()), axis=1, kind="stable")[:, :k])
        labels.append(batch_labels.numpy())
    return np.concatenate(best), np.concatenate(labels)


def model_facts(model: BenchModel) -> dict:
    built = model.architecture()
    artifacts = {"checkpoint": model.checkpoint_path.stat().st_size} if model.checkpoint_path else {}
    if model.export_dir is not None:
        for path in sorted(model.export_dir.glob("*.onnx")) + sorted(model.export_dir.glob("*.engine")):
            artifacts[path.name] = path.stat().st_size
    return {"arch": model.checkpoint.arch, "checkpoint": str(model.checkpoint_path) if model.checkpoint_path else None,
            "export_dir": str(model.export_dir) if model.export_dir else None,
            "params": count_parameters(built), "macs": count_macs(built, model.checkpoint.input_spec.shape),
            "macs_convention": MACS_CONVENTION, "input_spec": vars(model.checkpoint.input_spec), "artifacts": artifacts}


@contextmanager
def device_memory_growth(device: torch.device):
    """Yields a dict whose "bytes" is, on exit, how much more device memory is in use than on entry (cudaMemGetInfo:
    every allocator together, PyTorch's, ONNX Runtime's arena, TensorRT's engine and context memory). PyTorch's
    cache is emptied first, so the row cannot reuse blocks an earlier row freed without them being counted. None of
    these allocators gives memory back while a backend lives, so the growth at the end is the row's peak."""
    growth: dict = {"bytes": None}
    if device.type != "cuda":
        yield growth
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info(device)
    yield growth
    torch.cuda.synchronize(device)
    growth["bytes"] = free_before - torch.cuda.mem_get_info(device)[0]


def accuracy_row(model: BenchModel, backend_name: str, precision: str, device: torch.device, source: DataSource,
                 references: dict[str, np.ndarray], largest_batch: int) -> tuple[dict, InferenceBackend | None]:
    """The row's accuracy and agreement figures, and the backend for timing later (None when it cannot run here).
    The device memory the row takes is measured from before its backend exists to after its largest timed batch."""
    row = {"model": model.role, "backend": backend_name, "precision": precision, "device": device.type}
    with device_memory_growth(device) as memory:
        try:
            backend = make_backend(model, backend_name, precision, device)
        except BackendUnavailable as exc:
            return {**row, "skipped": str(exc)}, None
        best, labels = stream_predictions(backend, model, source, f"{model.role} {backend_name} {precision}")
        largest = min(largest_batch, backend.max_batch or largest_batch)
        backend.predict(np.zeros((largest, *model.checkpoint.input_spec.shape), dtype=np.float32))
    predictions, labels = torch.from_numpy(best[:, 0]), torch.from_numpy(labels)
    accuracy, sizes = split_accuracy(predictions, labels)
    top_k = {f"accuracy_top{TOP_K}": split_top_k_accuracy(torch.from_numpy(best), labels)} if best.shape[1] > 1 else {}
    artifact = backend.artifact or model.checkpoint_path
    row.update({
        "artifact": str(artifact), "bytes": artifact.stat().st_size,
        "provider": getattr(backend, "provider", None), "threads": backend.threads, "computes_in": backend.computes_in,
        "peak_device_memory_bytes": memory["bytes"],
        "accuracy": accuracy, **top_k, "images": sizes,
        "agreement": {"teacher": split_agreement(predictions, torch.from_numpy(references["teacher"])),
                      "fp32": split_agreement(predictions, torch.from_numpy(references[model.role]))},
    })
    return row, backend


def per_class_figures(models: list[BenchModel], references: dict[str, tuple[np.ndarray, np.ndarray]],
                      source: DataSource) -> dict:
    """Per-class top-1 and the confusion matrix (row = true class) of each model's FP32 reference predictions."""
    num_classes = models[0].checkpoint.num_classes
    figures: dict = {"class_names": models[0].checkpoint.class_names or source.class_names
                     or [str(c) for c in range(num_classes)],
                     "basis": "each model's FP32 reference: PyTorch, or ONNX Runtime FP32 in a folder without its checkpoint"}
    for model in models:
        best, labels = references[model.role]
        confusion = confusion_matrix(torch.from_numpy(best[:, 0]), torch.from_numpy(labels), num_classes)
        figures[model.role] = {"accuracy": per_class_accuracy(confusion), "confusion": confusion.tolist()}
    figures["images"] = np.bincount(labels, minlength=num_classes).tolist()  # the same test set for both models
    return figures


def reference_backend(model: BenchModel, device: torch.device) -> InferenceBackend:
    """FP32 predictions to measure agreement against: PyTorch on this device, or, in a folder copied without its
    checkpoint, ONNX Runtime on the CPU running model.onnx (export verified it against PyTorch)."""
    if model.checkpoint_path is None:
        return OnnxRuntimeBackend(model.export_dir / ONNX_FILES["fp32"], "fp32", torch.device("cpu"))
    return TorchBackend(model.checkpoint.build_model(), "fp32", device)


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
    references = {m.role: stream_predictions(reference_backend(m, device), m, source, f"{m.role} reference")
                  for m in models}
    reference_top1 = {role: best[:, 0] for role, (best, _labels) in references.items()}
    results, timed = [], {}
    for model in models:
        for backend_name in options.backends:
            for precision in options.precisions:
                row, backend = accuracy_row(model, backend_name, precision, device, source, reference_top1,
                                            max(options.batch_sizes))
                if backend is None:
                    log(f"skip {model.role} {backend_name} {precision}: {row['skipped']}")
                else:
                    timed[len(results)] = (backend, model.checkpoint.input_spec.shape)
                results.append(row)
    log(f"timing {len(timed)} rows in interleaved rounds")
    latencies = measure_interleaved({str(i): entry for i, entry in timed.items()}, options.batch_sizes,
                                    options.iterations, options.warmup, options.rounds)
    for index in timed:
        results[index].update(latencies[str(index)])
    report = {"schema": SCHEMA, "env": collect_environment(), "data": data, "settings": asdict(options),
              "models": {m.role: model_facts(m) for m in models}, "results": results,
              "per_class": per_class_figures(models, references, source)}
    atomic_write_json(out / "report.json", report)
    write_reports(report, out)
    return report
