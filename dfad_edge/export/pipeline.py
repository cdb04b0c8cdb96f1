"""The export stage: FP32 ONNX (always), FP16 ONNX, INT8 QDQ (TensorRT and CPU flavours), TensorRT engines,
and export.json describing all of it, every path in it relative to the export folder (see folder.py)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..checkpoint import ModelCheckpoint, load_checkpoint
from ..errors import DfadError
from ..io import atomic_write_json
from ..progress import log
from .calibration import SYNTHETIC_FILE, dataset_images, synthetic_images
from .folder import CHECKPOINT_FILE, EXPORT_JSON, ONNX_FILES, relative_to_folder
from .fp16_typing import fp16_storage_emulation
from .onnx_export import Float16Boundary, compare_logits, export_onnx, ort_session, run_onnx, verify_against_torch
from .qdq_rules import intended_precisions, qdq_summary, tensorrt_qdq_violations
from .quantize import quantize_int8
from .tensorrt_build import BENCH_BATCH_SIZES

FP16_RELATIVE_TOLERANCE = 5e-2


@dataclass
class ExportOptions:
    int8: bool = False
    fp16: bool = False
    tensorrt: bool = False
    calib: str = "synthetic"  # "synthetic" (data-free: the distillation's images) or any data source
    calib_images: int = 512
    calib_method: str = "minmax"
    synthetic: str | None = None  # default: synthetic.pt next to the checkpoint
    max_batch: int = 64
    data_dir: str | None = None
    verify_images: int = 256
    seed: int = 0
    int8_quantizer: str = "ort"  # who makes the TensorRT INT8 graph: ort (+ NVIDIA's placement) or modelopt
    batch_sizes: list[int] = field(default_factory=lambda: list(BENCH_BATCH_SIZES))  # engine profiles tuned for these
    device: str = "auto"  # where TensorRT engines are built (cuda[:N])


def _synthetic_path(checkpoint_path: Path, options: ExportOptions) -> Path:
    return Path(options.synthetic) if options.synthetic else checkpoint_path.parent / SYNTHETIC_FILE


def _portable(value: str | Path, out: Path) -> str:
    """A file or folder as export.json records it, relative to the export folder; a data source name as it is."""
    return relative_to_folder(value, out) if Path(value).exists() else str(value)


def _calibration_images(checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions, out: Path,
                        count: int, seed: int, split: str | None = None, skip: int = 0) -> tuple[torch.Tensor, str]:
    """Synthetic images (after the first ``skip``), or real images from the --calib source (its train split unless
    another is named); with where they came from, as export.json records it."""
    spec = checkpoint.input_spec
    if options.calib == "synthetic":
        path = _synthetic_path(checkpoint_path, options)
        return synthetic_images(path, spec, count, options.seed, skip), f"synthetic:{_portable(path, out)}"
    data_dir = Path(options.data_dir) if options.data_dir else None
    images = dataset_images(options.calib, spec, checkpoint.num_classes, checkpoint.class_names, count, seed, data_dir,
                            split)
    source = _portable(options.calib, out)
    return images, source if split is None else f"{source} ({split} split)"


def _verification_images(checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions,
                         out: Path) -> tuple[torch.Tensor, str]:
    """Images the INT8 graphs were not calibrated on: other synthetic images, or the data source's test split."""
    if options.calib != "synthetic" or _synthetic_path(checkpoint_path, options).is_file():
        return _calibration_images(checkpoint, checkpoint_path, options, out, options.verify_images, options.seed + 1,
                                   split=None if options.calib == "synthetic" else "test", skip=options.calib_images)
    generator = torch.Generator().manual_seed(options.seed + 1)
    return torch.randn(options.verify_images, *checkpoint.input_spec.shape, generator=generator), "gaussian noise"


def _onnx_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    return np.concatenate([run_onnx(session, images[i:i + 64].numpy()) for i in range(0, len(images), 64)])


def _fp16_emulated_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of an FP16-typed graph with FP16 storage emulated in FP32 arithmetic, as TensorRT runs it, and the same
    in every ONNX Runtime version (see fp16_storage_emulation)."""
    with tempfile.TemporaryDirectory() as scratch:
        emulated = Path(scratch) / path.name
        onnx.save(fp16_storage_emulation(onnx.load(str(path))), str(emulated))
        return _onnx_logits(emulated, images)


def _export_int8(out: Path, checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions,
                 verification: torch.Tensor, fp32_logits: np.ndarray) -> tuple[dict, dict]:
    images, source = _calibration_images(checkpoint, checkpoint_path, options, out, options.calib_images, options.seed)
    log(f"INT8 calibration: {len(images)} images from {source}")
    artifacts = {}
    # The CPU graph first: ModelOpt, when it makes the TensorRT graph, runs in a process of its own anyway.
    for key, flavour in (("int8_cpu", "cpu"), ("int8", "tensorrt")):
        path = quantize_int8(out / "model.onnx", out / ONNX_FILES[key], images, flavour, options.calib_method,
                             options.int8_quantizer)
        graph = onnx.load(str(path))
        logits = _fp16_emulated_logits(path, verification) if flavour == "tensorrt" else _onnx_logits(path, verification)
        artifacts[key] = {
            "path": path.name, "flavour": flavour, "bytes": path.stat().st_size,
            "quantizer": options.int8_quantizer if flavour == "tensorrt" else "ort",
            "agreement_with_fp32": compare_logits(fp32_logits, logits),
            "agreement_evaluated_as": "fp16 storage emulated" if flavour == "tensorrt" else "written",
            "qdq": qdq_summary(graph),
            "tensorrt_rule_violations": len(tensorrt_qdq_violations(graph)),
            "intended_precisions": intended_precisions(graph),
        }
        log(f"{path.name} ({flavour}): top-1 agreement with FP32 "
            f"{artifacts[key]['agreement_with_fp32']['top1_agreement']:.2%}")
    calibration = {"source": source, "images": len(images), "method": options.calib_method}
    return artifacts, calibration


def _copy_checkpoint(checkpoint_path: Path, out: Path) -> None:
    """The folder carries its checkpoint, so bench's PyTorch rows run wherever the folder is copied."""
    if checkpoint_path.resolve() != (out / CHECKPOINT_FILE).resolve():
        shutil.copyfile(checkpoint_path, out / CHECKPOINT_FILE)


def _portable_options(options: ExportOptions, out: Path) -> dict:
    """The options as export.json records them: the files and folders among them relative to the export folder."""
    recorded = asdict(options)
    for key in ("calib", "synthetic", "data_dir"):
        if recorded[key]:
            recorded[key] = _portable(recorded[key], out)
    return recorded


def run_export(checkpoint_path: Path, out: Path, options: ExportOptions) -> dict:
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    if options.max_batch < 1:
        raise DfadError("--max-batch must be at least 1")
    checkpoint = load_checkpoint(checkpoint_path)
    if options.int8 and options.calib == "synthetic":
        synthetic_images(_synthetic_path(checkpoint_path, options), checkpoint.input_spec, options.calib_images,
                         options.seed, skip=0)  # fail early
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.build_model()
    verification, verification_source = _verification_images(checkpoint, checkpoint_path, options, out)
    _copy_checkpoint(checkpoint_path, out)
    report = {"checkpoint": CHECKPOINT_FILE, "exported_from": relative_to_folder(checkpoint_path, out),
              "arch": checkpoint.arch, "num_classes": checkpoint.num_classes,
              "class_names": checkpoint.class_names, "input_spec": vars(checkpoint.input_spec),
              "options": _portable_options(options, out), "dfad_edge_version": __version__,
              "verification_images": {"source": verification_source, "count": len(verification)}, "artifacts": {}}

    exporter = export_onnx(model, checkpoint, out / ONNX_FILES["fp32"], options.max_batch)
    report["exporter"] = exporter
    report["artifacts"]["fp32"] = {"path": ONNX_FILES["fp32"], "bytes": (out / ONNX_FILES["fp32"]).stat().st_size,
                                   "verification": verify_against_torch(model, out / ONNX_FILES["fp32"], verification, options.max_batch),
                                   "intended_precisions": intended_precisions(onnx.load(str(out / ONNX_FILES["fp32"])))}
    log(f"model.onnx verified against PyTorch (exporter: {exporter})")
    fp32_logits = _onnx_logits(out / ONNX_FILES["fp32"], verification)
    if options.fp16:
        path = out / ONNX_FILES["fp16"]
        export_onnx(Float16Boundary(checkpoint.build_model()), checkpoint, path, options.max_batch, precision="fp16")
        report["artifacts"]["fp16"] = {
            "path": path.name, "bytes": path.stat().st_size,
            "verification": verify_against_torch(model, path, verification, options.max_batch, FP16_RELATIVE_TOLERANCE,
                                                 require_same_top1=False),
            "agreement_with_fp32": compare_logits(fp32_logits, _onnx_logits(path, verification)),
            "intended_precisions": intended_precisions(onnx.load(str(path))),
        }
    if options.int8:
        int8_artifacts, report["calibration"] = _export_int8(out, checkpoint, checkpoint_path, options, verification, fp32_logits)
        report["artifacts"].update(int8_artifacts)
    atomic_write_json(out / EXPORT_JSON, report)
    if options.tensorrt:
        from ..runtime import resolve_device
        from .tensorrt_build import build_engines

        try:
            report["engines"] = build_engines(out, options.batch_sizes, options.max_batch, resolve_device(options.device))
        except DfadError as exc:
            report["engines"] = {"skipped": str(exc)}
            atomic_write_json(out / EXPORT_JSON, report)
            raise
    return report
