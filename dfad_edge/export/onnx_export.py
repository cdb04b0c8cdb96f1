"""PyTorch -> ONNX with a dynamic batch axis, the model's input spec in the metadata, and verification
against PyTorch before the file counts as done."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from rich.markup import escape

from ..checkpoint import ModelCheckpoint
from ..errors import DfadError
from ..progress import log

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Logit differences above this (relative to the logit scale) mean the export is wrong, not just rounded.
MAX_RELATIVE_DIFF = 1e-3


class Float16Boundary(nn.Module):
    """FP16 inside, FP32 at the boundary: TensorRT 11 takes FP16 only from the graph's own types."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


def onnx_metadata(checkpoint: ModelCheckpoint, precision: str, max_batch: int) -> dict[str, str]:
    """What a copied export folder needs without the checkpoint: the input spec and classes for bench, the
    architecture for parameter and MAC counts, the batch range for build-engines."""
    return {
        "dfad_edge.arch": checkpoint.arch,
        "dfad_edge.arch_kwargs": json.dumps(checkpoint.arch_kwargs),
        "dfad_edge.num_classes": str(checkpoint.num_classes),
        "dfad_edge.input_spec": json.dumps(vars(checkpoint.input_spec)),
        "dfad_edge.class_names": json.dumps(checkpoint.class_names),
        "dfad_edge.precision": precision,
        "dfad_edge.max_batch": str(max_batch),
        "dfad_edge.provenance": json.dumps(checkpoint.provenance, default=str),
    }


def set_metadata(model: onnx.ModelProto, updates: dict[str, str]) -> None:
    """Change some metadata entries, keeping the others."""
    properties = {prop.key: prop.value for prop in model.metadata_props}
    onnx.helper.set_model_props(model, {**properties, **updates})


def read_metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, max_batch: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                opset_version=OPSET, dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    program.save(str(path))


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, max_batch: int) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def export_onnx(model: nn.Module, checkpoint: ModelCheckpoint, path: Path, max_batch: int, precision: str = "fp32") -> str:
    """Write the ONNX file; returns the exporter that produced it. Falls back to the TorchScript exporter
    when the default (dynamo) path fails, and says so."""
    model = model.eval().cpu()
    spec = checkpoint.input_spec
    example = torch.randn(2, *spec.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = "dynamo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export_dynamo(model, example, path, max_batch)
        except Exception as first_error:  # noqa: BLE001 - any exporter failure triggers the fallback
            log(f"[yellow]dynamo ONNX exporter failed ({type(first_error).__name__}: {escape(str(first_error)[:200])}); "
                "falling back to the TorchScript exporter[/]")
            exporter = "torchscript"
            try:
                _export_torchscript(model, example, path, max_batch)
            except Exception as second_error:  # noqa: BLE001
                raise DfadError(f"ONNX export failed with both exporters: {first_error}; then {second_error}") from None
    onnx_model = onnx.load(str(path))
    onnx.helper.set_model_props(onnx_model, onnx_metadata(checkpoint, precision, max_batch))
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
    return exporter


def ort_session(path: Path, providers: list | None = None, threads: int | None = None):
    """A session on these providers (names, or (name, options) pairs), CPU by default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})[0]


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "images": int(len(reference)),
    }


def verify_against_torch(model: nn.Module, path: Path, images: torch.Tensor, max_batch: int,
                         tolerance: float = MAX_RELATIVE_DIFF, require_same_top1: bool = True) -> dict:
    """ONNX Runtime and PyTorch on the same batches (1, 2 and the maximum); a disagreement is an error.
    FP16 graphs are held to logit closeness only: rounding may flip a near-tie between two classes."""
    session = ort_session(path)
    model = model.eval().cpu()
    results = {}
    for batch_size in sorted({1, 2, max_batch}):
        batch = images[:batch_size]
        if len(batch) < batch_size:
            batch = images[torch.arange(batch_size) % len(images)]
        with torch.inference_mode():
            expected = model(batch).float().numpy()
        comparison = compare_logits(expected, run_onnx(session, batch.numpy()))
        scale = max(1.0, float(np.abs(expected).max()))
        same_top1 = comparison["top1_agreement"] == 1.0 or not require_same_top1
        comparison["ok"] = comparison["max_abs_diff"] <= tolerance * scale and same_top1
        results[str(batch_size)] = comparison
    bad = {b: r for b, r in results.items() if not r["ok"]}
    if bad:
        raise DfadError(f"{path.name} disagrees with PyTorch: {bad}. The export is wrong; not using it.")
    return results
