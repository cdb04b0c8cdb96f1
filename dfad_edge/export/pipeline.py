"""The export stage: FP32 ONNX (always), FP16 ONNX, INT8 QDQ (TensorRT and CPU flavours), TensorRT engines,
and export.json describing all of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..checkpoint import ModelCheckpoint, load_checkpoint
from ..errors import DfadError
from ..io import atomic_write_json
from ..progress import log
from .calibration import GENERATOR_FILE, dataset_images, generator_images
from .onnx_export import Float16Boundary, compare_logits, export_onnx, ort_session, run_onnx, verify_against_torch
from .qdq_rules import qdq_summary, tensorrt_qdq_violations
from .quantize import quantize_int8

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx", "int8_cpu": "model.int8.cpu.onnx"}
ENGINE_FILES = {"fp32": "model.fp32.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}
FP16_RELATIVE_TOLERANCE = 5e-2


@dataclass
class ExportOptions:
    int8: bool = False
    fp16: bool = False
    tensorrt: bool = False
    calib: str = "generator"  # "generator" (data-free) or any data source
    calib_images: int = 512
    calib_method: str = "minmax"
    generator: str | None = None  # default: generator.pt next to the checkpoint
    max_batch: int = 64
    data_dir: str | None = None
    verify_images: int = 256
    seed: int = 0


def _generator_path(checkpoint_path: Path, options: ExportOptions) -> Path:
    return Path(options.generator) if options.generator else checkpoint_path.parent / GENERATOR_FILE


def _calibration_images(checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions,
                        count: int, seed: int, split: str | None = None) -> tuple[torch.Tensor, str]:
    """Generator images, or real images from the --calib source (its train split unless another is named)."""
    spec = checkpoint.input_spec
    if options.calib == "generator":
        path = _generator_path(checkpoint_path, options)
        return generator_images(path, spec, count, seed), f"generator:{path}"
    data_dir = Path(options.data_dir) if options.data_dir else None
    images = dataset_images(options.calib, spec, checkpoint.num_classes, checkpoint.class_names, count, seed, data_dir,
                            split)
    return images, options.calib if split is None else f"{options.calib} ({split} split)"


def _verification_images(checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions) -> tuple[torch.Tensor, str]:
    """Images the INT8 graphs were not calibrated on: other generator latents, or the data source's test split."""
    if options.calib != "generator" or _generator_path(checkpoint_path, options).is_file():
        return _calibration_images(checkpoint, checkpoint_path, options, options.verify_images, options.seed + 1,
                                   split=None if options.calib == "generator" else "test")
    generator = torch.Generator().manual_seed(options.seed + 1)
    return torch.randn(options.verify_images, *checkpoint.input_spec.shape, generator=generator), "gaussian noise"


def _onnx_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    return np.concatenate([run_onnx(session, images[i:i + 64].numpy()) for i in range(0, len(images), 64)])


def _export_int8(out: Path, checkpoint: ModelCheckpoint, checkpoint_path: Path, options: ExportOptions,
                 verification: torch.Tensor, fp32_logits: np.ndarray) -> tuple[dict, dict]:
    images, source = _calibration_images(checkpoint, checkpoint_path, options, options.calib_images, options.seed)
    log(f"INT8 calibration: {len(images)} images from {source}")
    artifacts = {}
    for key, flavour in (("int8", "tensorrt"), ("int8_cpu", "cpu")):
        path = quantize_int8(out / "model.onnx", out / ONNX_FILES[key], images, flavour, options.calib_method)
        graph = onnx.load(str(path))
        artifacts[key] = {
            "path": path.name, "flavour": flavour, "bytes": path.stat().st_size,
            "agreement_with_fp32": compare_logits(fp32_logits, _onnx_logits(path, verification)),
            "qdq": qdq_summary(graph),
            "tensorrt_rule_violations": len(tensorrt_qdq_violations(graph)),
        }
        log(f"{path.name} ({flavour}): top-1 agreement with FP32 "
            f"{artifacts[key]['agreement_with_fp32']['top1_agreement']:.2%}")
    calibration = {"source": source, "images": len(images), "method": options.calib_method}
    return artifacts, calibration


def _build_engines(out: Path, artifacts: dict, max_batch: int) -> dict:
    from .tensorrt_build import build_engine, cuda_gpu, import_tensorrt

    trt, gpu = import_tensorrt(), cuda_gpu()
    engines = {}
    for precision, engine_name in ENGINE_FILES.items():
        if precision not in artifacts:
            continue
        onnx_path = out / artifacts[precision]["path"]
        log(f"building TensorRT engine {engine_name} from {onnx_path.name}")
        sidecar = build_engine(onnx_path, out / engine_name, precision, (1, max(1, max_batch // 2), max_batch), trt=trt, gpu=gpu)
        engines[precision] = {"path": engine_name, "bytes": (out / engine_name).stat().st_size, **sidecar}
    return engines


def run_export(checkpoint_path: Path, out: Path, options: ExportOptions) -> dict:
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    if options.max_batch < 1:
        raise DfadError("--max-batch must be at least 1")
    checkpoint = load_checkpoint(checkpoint_path)
    if options.int8 and options.calib == "generator":
        generator_images(_generator_path(checkpoint_path, options), checkpoint.input_spec, 1, 0)  # fail early
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.build_model()
    verification, verification_source = _verification_images(checkpoint, checkpoint_path, options)
    report = {"checkpoint": str(checkpoint_path), "arch": checkpoint.arch, "num_classes": checkpoint.num_classes,
              "class_names": checkpoint.class_names, "input_spec": vars(checkpoint.input_spec),
              "options": asdict(options), "dfad_edge_version": __version__,
              "verification_images": {"source": verification_source, "count": len(verification)}, "artifacts": {}}

    exporter = export_onnx(model, checkpoint, out / ONNX_FILES["fp32"], options.max_batch)
    report["exporter"] = exporter
    report["artifacts"]["fp32"] = {"path": ONNX_FILES["fp32"], "bytes": (out / ONNX_FILES["fp32"]).stat().st_size,
                                   "verification": verify_against_torch(model, out / ONNX_FILES["fp32"], verification, options.max_batch)}
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
        }
    if options.int8:
        int8_artifacts, report["calibration"] = _export_int8(out, checkpoint, checkpoint_path, options, verification, fp32_logits)
        report["artifacts"].update(int8_artifacts)
    atomic_write_json(out / "export.json", report)
    if options.tensorrt:
        try:
            report["engines"] = _build_engines(out, report["artifacts"], options.max_batch)
        except DfadError as exc:
            report["engines"] = {"skipped": str(exc)}
            raise
        finally:
            atomic_write_json(out / "export.json", report)
    return report
