"""Serialised TensorRT engines from ONNX graphs; works with TensorRT 10 (JetPack 6) and 11.

Precision comes from the graph alone (FP32 graph, FP16-typed graph, INT8 QDQ graph typed FP16 outside its Q/DQ
pairs): the network is created strongly typed where the enum has that flag, and no precision flag is ever set
(TensorRT 11 removed them). Engines are built from an export folder's ONNX files alone, on the device that runs
them (``dfad-edge build-engines DIR``): no checkpoint, no calibration images, no ONNX Runtime. Each engine gets a
JSON sidecar that is checked on load, since an engine only runs on the GPU architecture and TensorRT version it was
built with; the timing cache is keyed by both for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from types import ModuleType

from rich.markup import escape

from ..errors import DfadError
from ..io import atomic_write_bytes, atomic_write_json
from ..progress import log
from .folder import ENGINE_FILES, ONNX_FILES, record_engines
from .onnx_export import read_metadata
from .qdq_rules import tensorrt_qdq_violations

INSTALL_HINT = ("TensorRT is not installed. On a desktop GPU: pip install 'dfad-edge[tensorrt]' (needs an NVIDIA GPU "
                "and driver). On a Jetson: use JetPack's system TensorRT (sudo apt install python3-libnvinfer; "
                "pip install tensorrt does not work there) in a venv made with --system-site-packages.")
# bench's default --batch-sizes: engines get one optimisation profile tuned for each.
BENCH_BATCH_SIZES = (1, 8, 64)


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise DfadError(INSTALL_HINT) from None
    return tensorrt


def cuda_gpu(device=None) -> dict:
    """The GPU a torch.device names (cuda:N; plain cuda or None: the current one): name, compute capability, index."""
    import torch

    if not torch.cuda.is_available():
        raise DfadError("building or running a TensorRT engine needs a CUDA GPU, and PyTorch sees none "
                        "(see dfad-edge doctor). The ONNX and INT8 files were written and run on a CPU.")
    if device is not None and device.type != "cuda":
        raise DfadError(f"TensorRT engines are built and run on a CUDA device, not {device} (use --device cuda[:N])")
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}", "index": index}


def engine_sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_suffix(engine_path.suffix + ".json")


def optimisation_profiles(batch_sizes: list[int], max_batch: int) -> list[tuple[int, int, int]]:
    """One (min, opt, max) profile per batch size bench times: each serves every batch from 1 to ``max_batch`` (so
    accuracy passes and odd last batches run) and is tuned for its own batch size, which bench selects to time it."""
    tuned = sorted({size for size in batch_sizes if 1 <= size <= max_batch}) or [max_batch]
    return [(1, size, max_batch) for size in tuned]


def timing_cache_path(folder: Path, tensorrt_version: str, gpu: dict) -> Path:
    """A timing cache is only valid for the GPU and TensorRT version that made it: the name says which they were."""
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu['name']}-sm{gpu['compute_capability']}-trt{tensorrt_version}")
    return folder / f"timing.{key.strip('-')}.cache"


def _load_timing_cache(config, cache_path: Path):
    foreign = sorted(p.name for p in cache_path.parent.glob("timing*.cache") if p != cache_path)
    if foreign:
        log(f"[yellow]note: not loading {escape(', '.join(foreign))}: made on another GPU or TensorRT version "
            f"(a timing cache is only valid where it was made); this build uses {cache_path.name}[/]")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        log(f"[yellow]note: TensorRT refused {cache_path.name} (it does not match this GPU and TensorRT); "
            "building without it[/]")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise DfadError("TensorRT refused even an empty timing cache (IBuilderConfig.set_timing_cache returned "
                            "False): this TensorRT installation is broken; run dfad-edge doctor")
    return cache


def _network_flags(trt: ModuleType) -> int:
    flags = 0
    creation_flags = trt.NetworkDefinitionCreationFlag
    # TensorRT 10 needs STRONGLY_TYPED for precision to follow the graph's types; 11 accepts and ignores it.
    if hasattr(creation_flags, "STRONGLY_TYPED"):
        flags |= 1 << int(creation_flags.STRONGLY_TYPED)
    return flags


def _parse_onnx(trt: ModuleType, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DfadError(f"TensorRT could not parse {onnx_path.name}: " + " | ".join(errors[:3]))
    return parser  # the network refers to weights the parser owns: keep it until the engine is built


def build_engine(onnx_path: Path, engine_path: Path, precision: str, profiles: list[tuple[int, int, int]],
                 trt: ModuleType, gpu: dict, workspace_gib: float = 2.0) -> dict:
    """Build and write one engine, its timing cache and its sidecar, on ``gpu``; returns the sidecar."""
    import torch

    started = time.perf_counter()
    with torch.cuda.device(gpu["index"]):  # TensorRT builds for the current CUDA device
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt))
        parser = _parse_onnx(trt, network, logger, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if hasattr(trt, "ProfilingVerbosity"):
            # Lets tools/trt_layer_precisions.py show which precision each layer really runs in.
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        cache_path = timing_cache_path(engine_path.parent, trt.__version__, gpu)
        cache = _load_timing_cache(config, cache_path)
        input_tensor = network.get_input(0)
        sample_shape = tuple(input_tensor.shape)[1:]
        for smallest, optimal, largest in profiles:
            profile = builder.create_optimization_profile()
            profile.set_shape(input_tensor.name, (smallest, *sample_shape), (optimal, *sample_shape),
                              (largest, *sample_shape))
            # Returns the profile's index, or -1 (no exception) when TensorRT finds the shapes invalid.
            if config.add_optimization_profile(profile) < 0:
                raise DfadError(f"TensorRT refused the optimisation profile min/opt/max batch {smallest}/{optimal}/"
                                f"{largest} for {onnx_path.name} (add_optimization_profile returned -1)")
        serialized = builder.build_serialized_network(network, config)
        del parser
    if serialized is None:
        raise DfadError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    sidecar = {
        "tensorrt_version": trt.__version__, "gpu_name": gpu["name"], "compute_capability": gpu["compute_capability"],
        "precision": precision, "profiles": [dict(zip(("min", "opt", "max"), profile)) for profile in profiles],
        "timing_cache": cache_path.name, "build_seconds": round(time.perf_counter() - started, 1),
        "onnx": onnx_path.name, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    atomic_write_json(engine_sidecar_path(engine_path), sidecar)
    return sidecar


def _graphs_to_build(folder: Path) -> dict[str, Path]:
    graphs = {precision: folder / ONNX_FILES[precision] for precision in ENGINE_FILES
              if (folder / ONNX_FILES[precision]).is_file()}
    if not graphs:
        names = ", ".join(ONNX_FILES[precision] for precision in ENGINE_FILES)
        raise DfadError(f"{folder} holds none of {names}: copy an export folder here (dfad-edge export writes them)")
    if "int8" in graphs:
        import onnx

        violations = tensorrt_qdq_violations(onnx.load(str(graphs["int8"])))
        if violations:
            raise DfadError(f"{graphs['int8'].name} breaks TensorRT's Q/DQ rules ({len(violations)}): "
                            + "; ".join(violations[:3]) + ". Export it again with dfad-edge export --int8.")
    return graphs


def build_engines(folder: Path, batch_sizes: list[int], max_batch: int | None = None, device=None,
                  trt: ModuleType | None = None, gpu: dict | None = None) -> dict:
    """Engines for every graph of an export folder, from its ONNX files alone; recorded in its export.json (when it
    has one) with paths relative to the folder. Everything that can be checked is checked before TensorRT is needed."""
    folder = Path(folder)
    graphs = _graphs_to_build(folder)
    if max_batch is None:
        max_batch = int(read_metadata(next(iter(graphs.values()))).get("dfad_edge.max_batch", max(BENCH_BATCH_SIZES)))
    profiles = optimisation_profiles(batch_sizes, max_batch)
    trt = trt or import_tensorrt()
    gpu = gpu or cuda_gpu(device)
    engines = {}
    for precision, onnx_path in graphs.items():
        engine_path = folder / ENGINE_FILES[precision]
        log(f"building TensorRT engine {engine_path.name} from {onnx_path.name} on {gpu['name']} "
            f"(profiles tuned for batch {', '.join(str(opt) for _, opt, _ in profiles)})")
        sidecar = build_engine(onnx_path, engine_path, precision, profiles, trt=trt, gpu=gpu)
        engines[precision] = {"path": engine_path.name, "bytes": engine_path.stat().st_size, **sidecar}
    record_engines(folder, engines)
    return engines


def check_engine_compatible(engine_path: Path, tensorrt_version: str, gpu: dict) -> dict:
    """Refuse, with a clear message, an engine built for another GPU or TensorRT version."""
    sidecar_path = engine_sidecar_path(engine_path)
    rebuild = f"rebuild it here with dfad-edge build-engines {engine_path.parent}"
    if not sidecar_path.is_file():
        raise DfadError(f"{engine_path.name} has no {sidecar_path.name}: its build environment is unknown; {rebuild}")
    sidecar = json.loads(sidecar_path.read_text())
    mismatches = []
    if sidecar["tensorrt_version"] != tensorrt_version:
        mismatches.append(f"TensorRT {sidecar['tensorrt_version']} (here {tensorrt_version})")
    if sidecar["compute_capability"] != gpu["compute_capability"] or sidecar["gpu_name"] != gpu["name"]:
        mismatches.append(f"GPU {sidecar['gpu_name']} sm {sidecar['compute_capability']} "
                          f"(here {gpu['name']} sm {gpu['compute_capability']})")
    if mismatches:
        raise DfadError(f"{engine_path.name} was built for " + " and ".join(mismatches) +
                        f". Engines are tied to the GPU and TensorRT version: {rebuild}.")
    return sidecar


class LoadedEngine:
    """A deserialized engine with the Logger and Runtime that made it and one execution context.

    TensorRT requires a Runtime (and its Logger) to outlive the engines it deserialized, and an engine to outlive its
    contexts; Python frees each object as soon as nothing references it, so all four live here and go together, in
    that order. Hold the LoadedEngine, not its parts."""

    def __init__(self, engine_path: Path, trt: ModuleType):
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise DfadError(f"TensorRT could not deserialize {engine_path.name} (another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DfadError(f"TensorRT could not create an execution context for {engine_path.name} (GPU memory?)")

    def __del__(self):
        for name in ("context", "engine", "runtime", "logger"):
            self.__dict__.pop(name, None)
