"""List the precision each layer of a TensorRT engine runs in (did the INT8 engine really run in INT8?).

    python tools/trt_layer_precisions.py model.int8.engine

Needs TensorRT and a GPU. Engines built by dfad-edge export set detailed profiling verbosity, so the inspector
reports per-layer precisions; for other engines it may only list layer names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from dfad_edge.errors import DfadError
from dfad_edge.export.tensorrt_build import import_tensorrt


def layer_precisions(engine_path: Path) -> list[dict]:
    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise DfadError(f"TensorRT could not deserialize {engine_path} (built for another GPU or TensorRT version?)")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):
            layers.append({"name": layer, "precision": "unknown (build with detailed profiling verbosity)"})
            continue
        outputs = layer.get("Outputs", [])
        precision = outputs[0].get("Format/Datatype", "?") if outputs else "?"
        layers.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"), "precision": precision})
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", type=Path)
    args = parser.parse_args()
    try:
        layers = layer_precisions(args.engine)
    except DfadError as exc:
        sys.exit(f"error: {exc}")
    for layer in layers:
        print(f"{layer.get('type', ''):24s} {layer['precision']:28s} {layer['name']}")
    print("\nsummary:", dict(Counter(layer["precision"] for layer in layers)))


if __name__ == "__main__":
    main()
