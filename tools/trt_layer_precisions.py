"""List the precision each layer of a TensorRT engine runs in (did the INT8 engine really run in INT8?).

    python tools/trt_layer_precisions.py model.int8.engine [--json layers.json]

Needs TensorRT and a GPU. Engines built by dfad-edge export set detailed profiling verbosity, so the engine
inspector reports each layer's input and output formats (e.g. "Thirty-two wide channel vectorized row major Int8
format", "Row major linear FP16 format"); a layer computes in the precision of its input. Other engines may only
list layer names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from dfad_edge.errors import DfadError
from dfad_edge.export.tensorrt_build import import_tensorrt
from dfad_edge.io import atomic_write_json

UNKNOWN = "unknown (build with detailed profiling verbosity)"


def normalize_datatype(text: str) -> str:
    """The inspector's free-text format string -> int8 / fp16 / fp32 / int32, or the text itself."""
    lowered = text.lower()
    for keys, name in ((("int8",), "int8"), (("fp16", "half"), "fp16"), (("int32",), "int32"), (("fp32", "float"), "fp32")):
        if any(key in lowered for key in keys):
            return name
    return text


def _first_datatype(tensors: list[dict]) -> str:
    return normalize_datatype(tensors[0].get("Format/Datatype", "?")) if tensors else "?"


def parse_engine_information(info: dict) -> list[dict]:
    """Layers from IEngineInspector.get_engine_information(JSON): name, type, input and output precision."""
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # the engine was built without detailed profiling verbosity
            layers.append({"name": layer, "type": "?", "precision": UNKNOWN, "output": UNKNOWN})
            continue
        layers.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"),
                       "precision": _first_datatype(layer.get("Inputs", [])),
                       "output": _first_datatype(layer.get("Outputs", []))})
    return layers


def layer_precisions(engine_path: Path, trt=None) -> list[dict]:
    trt = trt or import_tensorrt()
    if not engine_path.is_file():
        raise DfadError(f"{engine_path} not found (dfad-edge export --tensorrt writes model.<precision>.engine)")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise DfadError(f"TensorRT could not deserialize {engine_path} (built for another GPU or TensorRT version?)")
    inspector = engine.create_engine_inspector()
    return parse_engine_information(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))


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
        layers = layer_precisions(args.engine)
    except DfadError as exc:
        sys.exit(f"error: {exc}")
    for layer in layers:
        print(f"{layer['type']:24s} {layer['precision']:6s} -> {layer['output']:6s} {layer['name']}")
    counts = summary(layers)
    print(f"\nlayers by input precision: {counts['layers']}\nconvolutions by input precision: {counts['convolutions']}")
    if args.json:
        atomic_write_json(args.json, {"engine": str(args.engine), "layers": layers, "summary": counts})


if __name__ == "__main__":
    main()
