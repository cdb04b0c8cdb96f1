"""TensorRT code, checked without TensorRT or a GPU: a stand-in module offers only the documented TensorRT 10/11 Python
API and behaves as TensorRT does where dfad-edge depends on it (an engine needs its Runtime, a shape must fit the
active optimisation profile, bound memory must hold tensors of the engine's types while it runs), and stand-in CUDA
streams and devices record where the work went."""

import contextlib
import importlib.util
import itertools
import json
import shutil
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from dfad_edge.bench import backends
from dfad_edge.bench.report import precision_label
from dfad_edge.bench.runner import BenchOptions, accuracy_row, run_bench
from dfad_edge.checkpoint import InputSpec, model_checkpoint
from dfad_edge.errors import DfadError
from dfad_edge.export import tensorrt_build
from dfad_edge.export.onnx_export import export_onnx
from dfad_edge.export.quantize import quantize_int8
from dfad_edge.export.tensorrt_build import build_engine, check_engine_compatible, optimisation_profiles
from dfad_edge.models import create_model

TOOLS = Path(__file__).resolve().parent.parent / "tools"
ORIN = {"name": "Orin", "compute_capability": "8.7", "index": 0}
SPEC = InputSpec(1, 8, 8, [0.5], [0.25])
DataType = types.SimpleNamespace(FLOAT="float32", HALF="float16", INT8="int8", INT32="int32")


class FakeTensorRT:
    """TensorRT's Python API as far as dfad-edge uses it, recording calls; ``events`` records frees, in order."""

    def __init__(self, version="10.3.0", strongly_typed=True, parse_ok=True, io_type="FLOAT", cache_ok=True):
        self.__version__, self.calls, self.events = version, [], []
        self.DataType, self.TensorIOMode = DataType, types.SimpleNamespace(INPUT="input", OUTPUT="output")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, **({"STRONGLY_TYPED": 1} if strongly_typed else {}))
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.io_type, self.parse_ok, self.cache_ok = getattr(DataType, io_type), parse_ok, cache_ok
        self.failing: set[str] = set()  # execution-context calls that return False, as TensorRT's do on failure
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

            def __del__(self):
                fake.events.append("logger freed")

        self.Logger = Logger
        self.Builder, self.OnnxParser = self._builder_api()
        self.Runtime = self._runtime_api()

    def _builder_api(self):
        fake = self

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timing-cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("memory_pool", pool, size))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", data))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                return fake.cache_ok or cache.data == b""  # cache_ok=False: a stored cache does not match

            def add_optimization_profile(self, profile):
                """The profile's index, or -1 when its shapes are invalid (TensorRT returns, it does not raise)."""
                fake.calls.append(("add_profile", profile.shapes))
                _, smallest, optimal, largest = profile.shapes
                if not smallest[0] <= optimal[0] <= largest[0]:
                    return -1
                self.profiles = getattr(self, "profiles", 0) + 1
                return self.profiles - 1

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

        class Profile:
            def set_shape(self, name, smallest, optimal, largest):
                self.shapes = (name, smallest, optimal, largest)

        class Network:
            def get_input(self, index):
                return types.SimpleNamespace(name="images", shape=(-1, 1, 8, 8))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", torch.cuda.current_device()))
                return b"serialized-engine"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return fake.parse_ok

            def get_error(self, index):
                return "Unsupported operator FooBar"

        return Builder, OnnxParser

    def _runtime_api(self):
        fake = self
        profiles = [(1, 1, 8), (1, 8, 8)]  # what build_engine makes for batch sizes 1 and 8, max 8

        class Context:
            """Like TensorRT's IExecutionContext, a call that cannot be done returns False and changes nothing."""

            def __init__(self, engine):
                self.engine, self.profile, self.shape, self.addresses = engine, 0, None, {}

            def set_optimization_profile_async(self, index, stream):
                fake.calls.append(("profile", index, stream))
                if "set_optimization_profile_async" in fake.failing or not 0 <= index < len(profiles):
                    return False
                self.profile = index
                return True

            def set_input_shape(self, name, shape):
                smallest, _, largest = profiles[self.profile]
                if "set_input_shape" in fake.failing or not smallest <= shape[0] <= largest:
                    return False  # e.g. a batch outside the active profile
                self.shape = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                return (self.shape[0], 10)

            def set_tensor_address(self, name, address):
                if "set_tensor_address" in fake.failing or name not in ("images", "logits"):
                    return False
                self.addresses[name] = address
                return True

            def execute_async_v3(self, stream):
                """Reads the input and writes the output at the bound addresses, as the engine's types say."""
                assert self.engine.runtime() is not None, "engine used after its Runtime was freed"
                if "execute_async_v3" in fake.failing:
                    return False  # nothing written: the output buffer keeps whatever it held
                fake.calls.append(("execute", stream, profiles[self.profile][1], self.shape[0]))
                images, logits = (fake.memory_at(self.addresses[name]) for name in ("images", "logits"))
                torch_type = getattr(torch, fake.io_type)
                assert images.dtype == torch_type and logits.dtype == torch_type, "buffer type differs from the engine's"
                logits.copy_(images.reshape(len(images), -1)[:, :10] * 2)
                return True

            def __del__(self):
                fake.events.append("context freed")

        class Engine:
            num_io_tensors, num_optimization_profiles = 2, len(profiles)

            def __init__(self, runtime):
                self.runtime = weakref.ref(runtime)  # TensorRT does not keep its Runtime alive either

            def get_tensor_name(self, index):
                return ("images", "logits")[index]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name == "images" else fake.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return fake.io_type

            def get_tensor_profile_shape(self, name, index):
                return [(batch, 1, 8, 8) for batch in profiles[index]]

            def create_execution_context(self):
                return Context(self)

            def __del__(self):
                fake.events.append("engine freed")

        class Runtime:
            def __init__(self, logger):
                fake.runtimes.append(weakref.ref(self))

            def deserialize_cuda_engine(self, data):
                return Engine(self)

            def __del__(self):
                fake.events.append("runtime freed")

        self.runtimes = []
        return Runtime

    def memory_at(self, address) -> torch.Tensor:
        tensor = self.bound_tensors.get(address, lambda: None)()
        assert tensor is not None, "TensorRT would use memory at a bound address that was freed"
        return tensor


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA streams, events and devices that record where work went; PyTorch's current stream is off limits."""
    record = types.SimpleNamespace(streams=[], devices=[], properties=[], current=[0])
    numbers = itertools.count(1000)

    class Stream:
        def __init__(self, device=None):
            self.cuda_stream, self.device = next(numbers), device
            record.streams.append(self)

        def synchronize(self):
            pass

    class Event:
        def __init__(self, enable_timing=False):
            self.stream = None

        def record(self, stream=None):
            self.stream = stream

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            assert self.stream is end.stream, "start and end events recorded on different streams"
            return 1.0

    @contextlib.contextmanager
    def device(which):
        record.devices.append(which)
        index = which if isinstance(which, int) else (which.index or 0)
        record.current.append(index)
        yield
        record.current.pop()

    def current_stream(*_):
        raise AssertionError("work enqueued on PyTorch's current stream instead of the backend's own")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: record.current[-1])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: record.properties.append(index) or types.SimpleNamespace(name="Orin", major=8, minor=7))
    return record


@pytest.fixture
def fake_trt(monkeypatch, fake_cuda):
    """TensorRT as import_tensorrt() finds it; every address handed to TensorRT resolves to the tensor behind it, for
    as long as that tensor lives (TensorRT sees raw pointers, so a freed tensor is a dangling one)."""
    fake = FakeTensorRT()
    fake.bound_tensors = {}
    original = torch.Tensor.data_ptr

    def data_ptr(tensor):
        address = original(tensor)
        fake.bound_tensors[address] = weakref.ref(tensor)
        return address

    monkeypatch.setattr(torch.Tensor, "data_ptr", data_ptr)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: fake)
    return fake


def _engine(folder: Path, fake: FakeTensorRT, name="model.fp32.engine") -> Path:
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(b"onnx")
    build_engine(onnx_path, folder / name, "fp32", optimisation_profiles([1, 8], 8), trt=fake, gpu=ORIN)
    return folder / name


def _backend(folder: Path, fake: FakeTensorRT, monkeypatch) -> backends.TensorRTBackend:
    # Tensors live on the CPU here; TensorRT only ever sees their addresses.
    monkeypatch.setattr(tensorrt_build, "cuda_gpu", lambda device: ORIN)
    return backends.TensorRTBackend(_engine(folder, fake), "fp32", torch.device("cpu"))


def test_builder_follows_the_documented_api_with_a_profile_tuned_for_each_timed_batch(tmp_path, fake_cuda):
    fake = FakeTensorRT()
    engine = _engine(tmp_path, fake)
    sidecar = json.loads((tmp_path / "model.fp32.engine.json").read_text())
    assert ("create_network", 1 << 1) in fake.calls  # strongly typed: precision follows the graph
    assert not [call for call in fake.calls if call[0] == "set_flag"]  # never a precision flag
    assert [call[1] for call in fake.calls if call[0] == "add_profile"] == [
        ("images", (1, 1, 8, 8), (1, 1, 8, 8), (8, 1, 8, 8)), ("images", (1, 1, 8, 8), (8, 1, 8, 8), (8, 1, 8, 8))]
    assert sidecar["profiles"] == [{"min": 1, "opt": 1, "max": 8}, {"min": 1, "opt": 8, "max": 8}]
    assert engine.read_bytes() == b"serialized-engine"
    # TensorRT 11 has no STRONGLY_TYPED flag to set: the network is created without flags.
    trt11 = FakeTensorRT(version="11.4.1", strongly_typed=False)
    _engine(tmp_path, trt11, "e11.engine")
    assert ("create_network", 0) in trt11.calls
    # Batch sizes beyond the maximum get no profile; the maximum is always served.
    assert optimisation_profiles([1, 8, 64], 32) == [(1, 1, 32), (1, 8, 32)]


def test_timing_cache_is_kept_per_gpu_and_tensorrt_and_a_foreign_one_is_not_loaded(tmp_path, fake_cuda, monkeypatch):
    notes = []
    monkeypatch.setattr(tensorrt_build, "log", notes.append)
    (tmp_path / "timing.H100-sm9.0-trt10.3.0.cache").write_bytes(b"made on a desktop GPU")
    fake = FakeTensorRT()
    _engine(tmp_path, fake)
    own = tmp_path / "timing.Orin-sm8.7-trt10.3.0.cache"
    assert own.read_bytes() == b"timing-cache"
    assert ("create_timing_cache", b"") in fake.calls and ("create_timing_cache", b"made on a desktop GPU") not in fake.calls
    assert any("timing.H100-sm9.0-trt10.3.0.cache" in note and "another GPU" in note for note in notes)
    _engine(tmp_path, fake, "model.int8.engine")
    assert ("create_timing_cache", b"timing-cache") in fake.calls  # reused on this GPU
    refused = FakeTensorRT(cache_ok=False)
    _engine(tmp_path, refused, "other.engine")
    assert any("refused" in note for note in notes) and refused.calls.count(("create_timing_cache", b"")) == 1


def test_engine_built_elsewhere_is_refused_and_parse_errors_are_clear(tmp_path, fake_cuda):
    engine = _engine(tmp_path, FakeTensorRT())
    assert check_engine_compatible(engine, "10.3.0", ORIN)["precision"] == "fp32"
    with pytest.raises(DfadError, match="build-engines"):
        check_engine_compatible(engine, "10.3.0", {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(DfadError, match="TensorRT 10.3.0"):
        check_engine_compatible(engine, "11.4.1", ORIN)
    with pytest.raises(DfadError, match="Unsupported operator"):
        build_engine(tmp_path / "model.onnx", tmp_path / "bad.engine", "fp32", [(1, 1, 1)],
                     trt=FakeTensorRT(parse_ok=False), gpu=ORIN)


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """An export folder as export writes it: FP32 and TensorRT INT8 graphs, export.json, the checkpoint copy."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("exported")
    model = create_model("digits_cnn_small").eval()
    checkpoint = model_checkpoint(model, "digits_cnn_small", {}, 10, SPEC, [str(i) for i in range(10)], "test")
    checkpoint.save(folder / "checkpoint.pt")
    export_onnx(model, checkpoint, folder / "model.onnx", 16)
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", torch.randn(64, 1, 8, 8), "tensorrt")
    (folder / "export.json").write_text(json.dumps({"checkpoint": "checkpoint.pt", "artifacts": {}}))
    return folder


def test_a_copied_folder_builds_engines_from_its_onnx_files_alone(export_folder, tmp_path, fake_cuda, monkeypatch):
    device_folder = tmp_path / "on-the-jetson"
    device_folder.mkdir()
    for onnx_file in export_folder.glob("*.onnx"):
        shutil.copy(onnx_file, device_folder)
    result = run_cli("build-engines", device_folder)
    if importlib.util.find_spec("tensorrt") is None:
        assert result.exit_code == 2 and "TensorRT is not installed" in result.output and "Traceback" not in result.output
    fake = FakeTensorRT()
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: fake)
    result = run_cli("build-engines", device_folder, "--batch-sizes", "1,8", "--device", "cuda:1")
    assert result.exit_code == 0, result.output
    for engine in ("model.fp32.engine", "model.int8.engine"):
        sidecar = json.loads((device_folder / f"{engine}.json").read_text())
        # The largest batch comes from the ONNX metadata export wrote (--max-batch 16).
        assert sidecar["profiles"] == [{"min": 1, "opt": 1, "max": 16}, {"min": 1, "opt": 8, "max": 16}]
    assert ("build", 1) in fake.calls  # built on cuda:1, as asked
    # With export.json along, the engines are recorded there, relative to the folder.
    shutil.copy(export_folder / "export.json", device_folder)
    assert run_cli("build-engines", device_folder).exit_code == 0
    engines = json.loads((device_folder / "export.json").read_text())["engines"]
    assert {e["path"] for e in engines.values()} == {"model.fp32.engine", "model.int8.engine"}


def test_build_engines_refuses_a_folder_without_graphs_or_with_a_broken_int8_graph(export_folder, tmp_path):
    result = run_cli("build-engines", tmp_path)
    assert result.exit_code == 2 and "model.onnx" in result.output
    broken = onnx.load(str(export_folder / "model.int8.onnx"))
    for initializer in broken.graph.initializer:
        if initializer.name.endswith("zero_point"):
            initializer.CopyFrom(onnx.numpy_helper.from_array(np.ones_like(onnx.numpy_helper.to_array(initializer)),
                                                              initializer.name))
    onnx.save(broken, str(tmp_path / "model.int8.onnx"))
    result = run_cli("build-engines", tmp_path)
    assert result.exit_code == 2 and "breaks TensorRT's Q/DQ rules" in result.output and "zero-point" in result.output


def test_runner_keeps_runtime_and_logger_alive_as_long_as_the_engine(tmp_path, fake_trt, monkeypatch):
    backend = _backend(tmp_path, fake_trt, monkeypatch)
    assert all(runtime() is not None for runtime in fake_trt.runtimes)
    np.testing.assert_allclose(backend.predict(np.ones((2, 1, 8, 8), np.float32)), np.full((2, 10), 2.0))
    fake_trt.events.clear()
    del backend
    assert fake_trt.events == ["context freed", "engine freed", "runtime freed", "logger freed"]


def test_runner_uses_its_own_stream_and_the_profile_tuned_for_each_batch(tmp_path, fake_trt, fake_cuda, monkeypatch):
    backend = _backend(tmp_path, fake_trt, monkeypatch)
    own_stream = backend.stream.cuda_stream
    for batch in (8, 1, 3, 8):
        assert backend.predict(np.zeros((batch, 1, 8, 8), np.float32)).shape == (batch, 10)
    executions = [call for call in fake_trt.calls if call[0] == "execute"]
    # (stream, opt of the active profile, batch): batch 8 and 1 on their own profiles, 3 on the nearest.
    assert [call[1:] for call in executions] == [(own_stream, 8, 8), (own_stream, 1, 1), (own_stream, 1, 3),
                                                 (own_stream, 8, 8)]
    assert {call[2] for call in fake_trt.calls if call[0] == "profile"} == {own_stream}
    assert backend.max_batch == 8
    assert backend.device_compute_ms(np.zeros((8, 1, 8, 8), np.float32), iterations=3, warmup=1) == [1.0] * 3
    assert {call[1] for call in fake_trt.calls if call[0] == "execute"} == {own_stream}


@pytest.mark.parametrize("call", ["set_optimization_profile_async", "set_input_shape", "set_tensor_address",
                                  "execute_async_v3"])
def test_a_tensorrt_call_that_returns_false_stops_the_run_with_its_name(tmp_path, fake_trt, monkeypatch, call):
    backend = _backend(tmp_path, fake_trt, monkeypatch)
    images = np.ones((8, 1, 8, 8), np.float32)
    fake_trt.failing.add(call)
    # Batch 8 switches from the default profile 0 to profile 1, so every call of the binding runs.
    with pytest.raises(DfadError, match=f"TensorRT {call}.*failed on model.fp32.engine"):
        backend.predict(images)
    with pytest.raises(DfadError, match=f"TensorRT {call}"):
        backend.device_compute_ms(images, iterations=2, warmup=1)
    fake_trt.failing.clear()
    np.testing.assert_allclose(backend.predict(images), np.full((8, 10), 2.0))


def test_an_invalid_optimisation_profile_is_refused_by_name(tmp_path, fake_cuda):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(DfadError, match="refused the optimisation profile min/opt/max batch 1/16/8"):
        build_engine(tmp_path / "model.onnx", tmp_path / "m.engine", "fp32", [(1, 16, 8)], trt=FakeTensorRT(), gpu=ORIN)


def test_bound_buffers_stay_alive_while_tensorrt_may_write_to_them(tmp_path, fake_trt, monkeypatch):
    backend = _backend(tmp_path, fake_trt, monkeypatch)
    # The compute-time path binds once and executes many times: both buffers must outlive the binding call.
    backend.device_compute_ms(np.ones((4, 1, 8, 8), np.float32), iterations=5, warmup=2)
    assert len([call for call in fake_trt.calls if call[0] == "execute"]) == 7


def test_runner_feeds_and_reads_the_engines_own_tensor_types(tmp_path, fake_trt, monkeypatch):
    fake_trt.io_type = DataType.HALF  # an engine with FP16 input and output, not the FP32 boundary dfad-edge exports
    backend = _backend(tmp_path, fake_trt, monkeypatch)
    logits = backend.predict(np.full((2, 1, 8, 8), 1.5, np.float32))
    assert logits.dtype == np.float32 and np.all(logits == 3.0)


def test_the_cuda_device_asked_for_is_the_one_used(tmp_path, fake_trt, fake_cuda):
    engine = _engine(tmp_path, fake_trt)
    backend = backends.TensorRTBackend(engine, "fp32", torch.device("cuda", 1))
    assert fake_cuda.properties[-1] == 1  # compatibility checked against GPU 1
    assert torch.device("cuda", 1) in fake_cuda.devices and backend.stream.device == torch.device("cuda", 1)
    assert tensorrt_build.cuda_gpu(torch.device("cuda", 1))["index"] == 1


def test_onnxruntime_on_cuda_runs_on_a_stream_of_its_own_on_the_gpu_asked_for(tmp_path, fake_cuda, monkeypatch):
    import onnxruntime

    (tmp_path / "model.onnx").write_bytes(b"onnx")
    sessions = []

    class Session:
        def __init__(self, providers):
            self.providers = providers

        def get_providers(self):
            return [self.providers[0][0]]

        def get_inputs(self):
            return [types.SimpleNamespace(name="images")]

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backends, "ort_session", lambda path, providers, threads: sessions.append(Session(providers)) or sessions[-1])
    backend = backends.OnnxRuntimeBackend(tmp_path / "model.onnx", "fp32", torch.device("cuda", 1))
    name, options = sessions[0].providers[0]
    assert name == "CUDAExecutionProvider" and options["device_id"] == 1
    assert options["user_compute_stream"] == str(backend.stream.cuda_stream) and backend.stream.device == torch.device("cuda", 1)
    assert backend.computes_in is None
    # A Q/DQ graph on the CUDA provider is dequantized and convolved in float: the row says so.
    int8 = backends.OnnxRuntimeBackend(tmp_path / "model.onnx", "int8", torch.device("cuda", 1))
    assert int8.computes_in.startswith("float (Q/DQ dequantized")
    assert precision_label({"precision": "int8", "computes_in": int8.computes_in}) == "int8, run in float"
    monkeypatch.setattr(Session, "get_providers", lambda self: ["CPUExecutionProvider"])
    with pytest.raises(backends.BackendUnavailable, match="fell back to the CPU"):
        backends.OnnxRuntimeBackend(tmp_path / "model.onnx", "fp32", torch.device("cuda", 1))


def test_peak_device_memory_is_each_rows_own(monkeypatch):
    free = [8 << 30]
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 16 << 30))

    class Backend(backends.InferenceBackend):
        """Takes ``held`` bytes of device memory for its engine and ``per_image`` for each image of a batch."""
        name, precision, device, threads, artifact = "fake", "fp32", "cuda", None, Path(__file__)

        def __init__(self, held, per_image):
            self.per_image, self.peak = per_image, 0
            free[0] -= held

        def predict(self, images):
            grow = max(0, self.per_image * len(images) - self.peak)
            free[0] -= grow  # the allocator keeps what it took, as PyTorch's, ONNX Runtime's and TensorRT's do
            self.peak += grow
            return np.zeros((len(images), 10), np.float32)

    def accuracy_pass(backend, model, source, description):
        """300 test images in batches of 64, as the streaming accuracy pass feeds them."""
        for start in range(0, 300, 64):
            backend.predict(np.zeros((min(64, 300 - start), 1, 8, 8), np.float32))
        return np.zeros((300, 1), np.int64), np.zeros(300, np.int64)

    monkeypatch.setattr("dfad_edge.bench.runner.stream_predictions", accuracy_pass)
    rows = {}
    spec = types.SimpleNamespace(shape=(1, 8, 8))
    model = types.SimpleNamespace(role="student", checkpoint_path=None, checkpoint=types.SimpleNamespace(input_spec=spec))
    references = {"teacher": np.zeros(300, np.int64), "student": np.zeros(300, np.int64)}
    for held, per_image in ((100 << 20, 1 << 20), (10 << 20, 2 << 20)):
        monkeypatch.setattr("dfad_edge.bench.runner.make_backend", lambda *args, h=held, p=per_image: Backend(h, p))
        rows[held], _ = accuracy_row(model, "fake", "fp32", torch.device("cuda"), None, references, 256)
    # Each row: what it holds plus its largest batch (256 images timed, more than the 64 of the accuracy pass).
    assert rows[100 << 20]["peak_device_memory_bytes"] == (100 << 20) + 256 * (1 << 20)
    assert rows[10 << 20]["peak_device_memory_bytes"] == (10 << 20) + 256 * (2 << 20)
    assert calls == ["empty_cache", "empty_cache"]


def test_bench_reads_an_export_folder_copied_elsewhere(export_folder, tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(export_folder, copied)
    options = BenchOptions(backends=["torch", "onnxruntime"], precisions=["fp32"], batch_sizes=[1], iterations=2,
                           warmup=0, rounds=1, device="cpu")
    report = run_bench(copied, copied, "digits", tmp_path / "bench", options)
    rows = {(row["backend"], row["precision"]): row for row in report["results"] if row["model"] == "student"}
    assert rows[("torch", "fp32")]["artifact"] == str(copied / "checkpoint.pt")
    assert rows[("onnxruntime", "fp32")]["agreement"]["fp32"]["100%"] == 1.0
    # Copied without its checkpoint: the ONNX metadata describes the model, ONNX Runtime gives the FP32 reference.
    (copied / "checkpoint.pt").unlink()
    report = run_bench(copied, copied, "digits", tmp_path / "bench-onnx-only", options)
    rows = {(row["backend"], row["precision"]): row for row in report["results"] if row["model"] == "student"}
    assert "checkpoint.pt" in rows[("torch", "fp32")]["skipped"]
    assert rows[("onnxruntime", "fp32")]["agreement"]["fp32"]["100%"] == 1.0
    assert report["models"]["student"]["params"] == sum(p.numel() for p in create_model("digits_cnn_small").parameters())


def test_layer_precisions_read_tensorrt_10_and_11_inspector_json():
    sys.path.insert(0, str(TOOLS))
    try:
        from trt_layer_precisions import io_tensors, parse_engine_information, summary
    finally:
        sys.path.remove(str(TOOLS))
    # TensorRT 10: one "Format/Datatype" text per tensor, "Bindings" a list of names.
    trt10 = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "layer1.0.conv1 + add + relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "a", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
         "Outputs": [{"Name": "b", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}]},
        {"Name": "fc", "LayerType": "gemm", "Inputs": [{"Format/Datatype": "Half"}], "Outputs": [{"Format/Datatype": "Float"}]},
    ], "Bindings": ["images", "logits"]}
    # TensorRT 11: the format and the data type in fields of their own; "I/O Tensors" objects replace "Bindings".
    trt11 = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "images", "Format": "Row major linear FP32 format (kLINEAR)", "DataType": "Float"}],
         "Outputs": [{"Name": "a", "Format": "Row major linear FP16 format (kLINEAR)", "DataType": "Half"}]},
        {"Name": "layer1.0.conv1 + add + relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "a", "Format": "Thirty-two wide channel vectorized row major (kCHW32)", "DataType": "Int8"}],
         "Outputs": [{"Name": "b", "Format": "Thirty-two wide channel vectorized row major (kCHW32)", "DataType": "Int8"}]},
        {"Name": "fc", "LayerType": "gemm", "Inputs": [{"DataType": "Half"}], "Outputs": [{"DataType": "Float"}]},
    ], "I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"},
                       {"Name": "logits", "IOMode": "Output", "DataType": "Float"}]}
    for info in (trt10, trt11):
        layers = parse_engine_information(info)
        assert [(layer["precision"], layer["output"]) for layer in layers] == [("fp32", "fp16"), ("int8", "int8"),
                                                                                ("fp16", "fp32")]
        assert summary(layers)["convolutions"] == {"fp32": 1, "int8": 1}
    assert io_tensors(trt11) == [{"name": "images", "mode": "input", "precision": "fp32"},
                                 {"name": "logits", "mode": "output", "precision": "fp32"}]
    assert io_tensors(trt10) == [{"name": "images", "mode": "?", "precision": "?"},
                                 {"name": "logits", "mode": "?", "precision": "?"}]
    assert parse_engine_information({"Layers": ["conv1"]})[0]["precision"].startswith("unknown")
