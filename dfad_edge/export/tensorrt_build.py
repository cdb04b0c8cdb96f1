"""Serialised TensorRT engines from ONNX graphs; works with TensorRT 10 (JetPack 6) and 11.

Precision comes from the graph alone (FP32 graph, FP16-typed graph, INT8 QDQ graph): the network is created
strongly typed where the enum has that flag, and no precision flag is ever set (TensorRT 11 removed them).
Each engine gets a JSON sidecar that is checked on load, since an engine only runs on the GPU architecture and
TensorRT version it was built with.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import ModuleType

from ..errors import DfadError
from ..io import atomic_write_bytes, atomic_write_json

INSTALL_HINT = ("TensorRT is not installed. On a desktop GPU: pip install 'dfad-edge[tensorrt]' (needs an NVIDIA GPU "
                "and driver). On a Jetson: use JetPack's system TensorRT (sudo apt install python3-libnvinfer; "
                "pip install tensorrt does not work there) in a venv made with --system-site-packages.")


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise DfadError(INSTALL_HINT) from None
    return tensorrt


def cuda_gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise DfadError("building or running a TensorRT engine needs a CUDA GPU, and PyTorch sees none "
                        "(see dfad-edge doctor). The ONNX and INT8 files were written and run on a CPU.")
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def engine_sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_suffix(engine_path.suffix + ".json")


def _network_flags(trt: ModuleType) -> int:
    flags = 0
    creation_flags = trt.NetworkDefinitionCreationFlag
    # TensorRT 10 needs STRONGLY_TYPED for precision to follow the graph's types; 11 accepts and ignores it.
    if hasattr(creation_flags, "STRONGLY_TYPED"):
        flags |= 1 << int(creation_flags.STRONGLY_TYPED)
    return flags


def _parse_onnx(trt: ModuleType, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DfadError(f"TensorRT could not parse {onnx_path.name}: " + " | ".join(errors[:3]))


def _load_timing_cache(config, cache_path: Path):
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    return cache


def build_engine(onnx_path: Path, engine_path: Path, precision: str, batch_range: tuple[int, int, int],
                 workspace_gib: float = 2.0, trt: ModuleType | None = None, gpu: dict | None = None) -> dict:
    """Build and write one engine, its timing cache and its sidecar; returns the sidecar."""
    trt = trt or import_tensorrt()
    gpu = gpu or cuda_gpu()
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    _parse_onnx(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt, "ProfilingVerbosity"):
        # Lets tools/trt_layer_precisions.py show which precision each layer really runs in.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_path = engine_path.parent / "timing.cache"
    cache = _load_timing_cache(config, cache_path)
    profile = builder.create_optimization_profile()
    input_tensor = network.get_input(0)
    sample_shape = tuple(input_tensor.shape)[1:]
    smallest, optimal, largest = batch_range
    profile.set_shape(input_tensor.name, (smallest, *sample_shape), (optimal, *sample_shape), (largest, *sample_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DfadError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    sidecar = {
        "tensorrt_version": trt.__version__, "gpu_name": gpu["name"], "compute_capability": gpu["compute_capability"],
        "precision": precision, "batch_range": list(batch_range), "build_seconds": round(time.perf_counter() - started, 1),
        "onnx": onnx_path.name, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    atomic_write_json(engine_sidecar_path(engine_path), sidecar)
    return sidecar


def check_engine_compatible(engine_path: Path, tensorrt_version: str, gpu: dict) -> dict:
    """Refuse, with a clear message, an engine built for another GPU or TensorRT version."""
    sidecar_path = engine_sidecar_path(engine_path)
    if not sidecar_path.is_file():
        raise DfadError(f"{engine_path.name} has no {sidecar_path.name}: its build environment is unknown. "
                        "Rebuild it on this machine with dfad-edge export --tensorrt.")
    sidecar = json.loads(sidecar_path.read_text())
    mismatches = []
    if sidecar["tensorrt_version"] != tensorrt_version:
        mismatches.append(f"TensorRT {sidecar['tensorrt_version']} (here {tensorrt_version})")
    if sidecar["compute_capability"] != gpu["compute_capability"] or sidecar["gpu_name"] != gpu["name"]:
        mismatches.append(f"GPU {sidecar['gpu_name']} sm {sidecar['compute_capability']} "
                          f"(here {gpu['name']} sm {gpu['compute_capability']})")
    if mismatches:
        raise DfadError(f"{engine_path.name} was built for " + " and ".join(mismatches) +
                        ". Engines are tied to the GPU and TensorRT version: rebuild it here with dfad-edge export --tensorrt.")
    return sidecar
