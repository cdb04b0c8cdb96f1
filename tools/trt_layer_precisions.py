"""List the precision each layer of a TensorRT engine runs in (did the INT8 engine really run in INT8?).

    python tools/trt_layer_precisions.py model.int8.engine [--json layers.json]

Needs TensorRT and a GPU. Engines built by dfad-edge set detailed profiling verbosity, so the engine inspector
reports each layer's input and output tensors; a layer computes in the precision of its input. The inspector's JSON
differs between versions (TensorRT's migration guide, "IEngineInspector JSON Output"): TensorRT 10 gives each tensor
one "Format/Datatype" text ("Thirty-two wide channel vectorized row major Int8 format") and lists the engine's I/O
as "Bindings" (names); TensorRT 11 gives "Format" and "DataType" ("Int8", "Half", "Float") separately and lists the
I/O as "I/O Tensors" objects with their DataType. Both are read. An engine with dynamic shapes reports its formats
only for a context with input shapes set, so the inspector is given one, at each input's opt shape of profile 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from dfad_edge.errors import DfadError
from dfad_edge.export.tensorrt_build import LoadedEngine, import_tensorrt
from dfad_edge.io import atomic_write_json

UNKNOWN = "unknown (build with detailed profiling verbosity)"


def normalize_datatype(text: str) -> str:
    """A TensorRT 11 DataType ("Int8", "Half", "BFloat16") or a TensorRT 10 format text -> int8 / fp16 / bf16 /
    fp8 / fp32 / int32 / int64, or the text itself. bf16 before fp32: "BFloat16" contains "float"."""
    lowered = text.lower()
    for keys, name in ((("int8",), "int8"), (("fp16", "half"), "fp16"), (("bf16", "bfloat16"), "bf16"),
                       (("fp8",), "fp8"), (("int32",), "int32"), (("int64",), "int64"), (("fp32", "float"), "fp32")):
        if any(key in lowered for key in keys):
            return name
    return text


def tensor_precision(tensor: dict) -> str:
    """TensorRT 11's DataType field when there is one, else TensorRT 10's combined format text."""
    return normalize_datatype(tensor.get("DataType") or tensor.get("Format/Datatype") or "?")


def _first_precision(tensors: list[dict]) -> str:
    return tensor_precision(tensors[0]) if tensors else "?"


def parse_engine_information(info: dict) -> list[dict]:
    """Layers from IEngineInspector.get_engine_information(JSON): name, type, input and output precision."""
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # the engine was built without detailed profiling verbosity
            layers.append({"name": layer, "type": "?", "precision": UNKNOWN, "output": UNKNOWN})
            continue
        layers.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"),
                       "precision": _first_precision(layer.get("Inputs", [])),
                       "output": _first_precision(layer.get("Outputs", []))})
    return layers


def io_tensors(info: dict) -> list[dict]:
    """The engine's inputs and outputs: with their types from TensorRT 11's "I/O Tensors", names only from 10's
    "Bindings"."""
    if "I/O Tensors" in info:
        return [{"name": tensor.get("Name", "?"), "mode": str(tensor.get("IOMode", "?")).lower(),
                 "precision": tensor_precision(tensor)} for tensor in info["I/O Tensors"]]
    return [{"name": name, "mode": "?", "precision": "?"} for name in info.get("Bindings", [])]


def engine_information(engine_path: Path, trt=None) -> dict:
    trt = trt or import_tensorrt()
    if not engine_path.is_file():
        raise DfadError(f"{engine_path} not found (dfad-edge build-engines writes model.<precision>.engine)")
    loaded = LoadedEngine(engine_path, trt)
    engine, context = loaded.engine, loaded.context
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, engine.get_tensor_profile_shape(name, 0)[1])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    information = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    del inspector  # before the engine it inspects goes with `loaded`
    return information


def summary(layers: list[dict]) -> dict:
    convolutions = [layer for layer in layers if "conv" in layer["type"].lower()]
    return {"layers": dict(Counter(layer["precision"] for layer in layers)),
            "convolutions": dict(Counter(layer["precision"] for layer in convolutions))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--json", type=Path, help="also write the layer list and summary as JSON")
    args = parser.parse_args()
    try:
        information = engine_information(args.engine)
    except DfadError as exc:
        sys.exit(f"error: {exc}")
    layers, io = parse_engine_information(information), io_tensors(information)
    for tensor in io:
        print(f"{tensor['mode']:6s} {tensor['precision']:6s} {tensor['name']}")
    for layer in layers:
        print(f"{layer['type']:24s} {layer['precision']:6s} -> {layer['output']:6s} {layer['name']}")
    counts = summary(layers)
    print(f"\nlayers by input precision: {counts['layers']}\nconvolutions by input precision: {counts['convolutions']}")
    if args.json:
        atomic_write_json(args.json, {"engine": str(args.engine), "io": io, "layers": layers, "summary": counts})


if __name__ == "__main__":
    main()
