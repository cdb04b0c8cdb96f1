"""An export folder: the files export writes into it, and export.json recording every path relative to the folder,
so the folder can be copied to another machine (a Jetson) and used there: build-engines needs only its ONNX files,
bench only the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import InputSpec, ModelCheckpoint
from ..errors import DfadError
from ..io import atomic_write_json
from .onnx_export import read_metadata

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx", "int8_cpu": "model.int8.cpu.onnx"}
ENGINE_FILES = {"fp32": "model.fp32.engine", "fp16": "model.fp16.engine", "int8": "model.int8.engine"}
EXPORT_JSON = "export.json"
CHECKPOINT_FILE = "checkpoint.pt"  # a copy of the exported checkpoint: bench's PyTorch rows on the target need it


def relative_to_folder(path: Path | str, folder: Path) -> str:
    """``path`` as export.json records it: relative to the export folder (through .. when it lies outside)."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def read_export_json(folder: Path) -> dict:
    path = Path(folder) / EXPORT_JSON
    if not path.is_file():
        raise DfadError(f"{folder} is not a dfad-edge export folder (no {EXPORT_JSON}; dfad-edge export writes one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DfadError(f"{path} is not valid JSON ({exc}); export again to rewrite it") from None


def record_engines(folder: Path, engines: dict) -> None:
    """Write the engines built in this folder into its export.json, when it has one."""
    if (Path(folder) / EXPORT_JSON).is_file():
        atomic_write_json(Path(folder) / EXPORT_JSON, {**read_export_json(folder), "engines": engines})


def described_model(folder: Path) -> ModelCheckpoint:
    """The exported model as model.onnx's metadata describes it (architecture, classes, input spec), without its
    weights: what a folder copied without checkpoint.pt still tells about the model."""
    metadata = read_metadata(Path(folder) / ONNX_FILES["fp32"])
    try:
        return ModelCheckpoint(arch=metadata["dfad_edge.arch"],
                               arch_kwargs=json.loads(metadata.get("dfad_edge.arch_kwargs", "{}")),
                               num_classes=int(metadata["dfad_edge.num_classes"]),
                               input_spec=InputSpec(**json.loads(metadata["dfad_edge.input_spec"])), state_dict={},
                               class_names=json.loads(metadata["dfad_edge.class_names"]))
    except KeyError as missing:
        raise DfadError(f"{folder / ONNX_FILES['fp32']} lacks the dfad-edge metadata {missing}: export it again") from None
