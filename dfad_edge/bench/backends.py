"""One inference-backend interface, so accuracy and latency are written once for PyTorch, ONNX Runtime and TensorRT.

A backend takes a normalised float32 batch (numpy, N x C x H x W) and returns logits (numpy). On CUDA,
``device_compute_ms`` times the compute alone with CUDA events recorded on the stream the work runs on, inputs
already on the device (what trtexec calls GPU compute time). ONNX Runtime and TensorRT each run on a CUDA stream of
their own; PyTorch runs on its current stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from ..errors import DfadError
from ..export.onnx_export import ort_session


class BackendUnavailable(Exception):
    """This backend/precision cannot run here; the message is the reason written into the report."""


class InferenceBackend(ABC):
    name: str
    precision: str
    device: str
    artifact: Path | None = None
    threads: int | None = None
    max_batch: int | None = None  # engines are built for a batch range; None = any batch
    # What the arithmetic really is where it differs from the precision of the artifact (None: the same).
    computes_in: str | None = None

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """End to end: host batch in, host logits out (copies included)."""

    def device_compute_ms(self, images: np.ndarray, iterations: int, warmup: int) -> list[float] | None:
        """GPU compute time per call with inputs already on the device; None on a CPU."""
        return None


def _cuda_event_times(run, iterations: int, warmup: int, stream: torch.cuda.Stream) -> list[float]:
    """Milliseconds between two CUDA events around each call, both recorded on ``stream``: the stream ``run``
    enqueues its work on (events on another stream would time that stream, not the work)."""
    for _ in range(warmup):
        run()
    stream.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_index(device: torch.device) -> int:
    """The N of cuda:N (plain "cuda" means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


class TorchBackend(InferenceBackend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device):
        if precision == "int8":
            raise BackendUnavailable("PyTorch eager has no INT8 path for these models; INT8 runs in onnxruntime/tensorrt")
        if precision == "fp16" and device.type != "cuda":
            raise BackendUnavailable("FP16 in PyTorch eager needs CUDA (CPU FP16 kernels are slow or missing)")
        self.precision, self.device = precision, device.type
        self.torch_device = device
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.eval().to(device=device, dtype=self.dtype)
        if device.type == "cuda":
            # The baseline at its best, as TensorRT is at its: cuDNN picks the fastest kernel per input shape (the
            # warm-up pays for the search), and channels_last weights and inputs take the tensor-core kernels.
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        else:
            self.threads = torch.get_num_threads()

    def _device_batch(self, images: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(images).to(self.torch_device, dtype=self.dtype)
        return batch.contiguous(memory_format=torch.channels_last) if self.device == "cuda" else batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model(self._device_batch(images)).float().cpu().numpy()

    @torch.inference_mode()
    def device_compute_ms(self, images, iterations, warmup):
        if self.device != "cuda":
            return None
        batch = self._device_batch(images)
        return _cuda_event_times(lambda: self.model(batch), iterations, warmup, torch.cuda.current_stream(self.torch_device))


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, device: torch.device):
        import onnxruntime as ort

        if not path.is_file():
            raise BackendUnavailable(f"{path.name} not found (run dfad-edge export{' --int8' if precision == 'int8' else ''}"
                                     f"{' --fp16' if precision == 'fp16' else ''})")
        self.precision, self.device, self.artifact, self.torch_device = precision, device.type, path, device
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
            # ONNX Runtime's kernels run on this stream of ours (not the default stream, which it refuses), so CUDA
            # events recorded on it time ONNX Runtime's compute.
            self.stream = torch.cuda.Stream(device=device)
            providers = [("CUDAExecutionProvider", {"device_id": cuda_index(device),
                                                    "user_compute_stream": str(self.stream.cuda_stream)}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        # On a CPU: the same thread count as PyTorch, so CPU rows compare like with like.
        threads = torch.get_num_threads() if device.type == "cpu" else None
        try:
            self.session = ort_session(path, providers, threads)
        except Exception as exc:  # noqa: BLE001 - an unsupported graph on this provider is a skip, not a crash
            raise BackendUnavailable(f"onnxruntime cannot load {path.name} on {device.type}: {str(exc)[:200]}") from None
        self.provider = self.session.get_providers()[0]
        if device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise BackendUnavailable("onnxruntime could not start its CUDA provider (CUDA or cuDNN libraries missing?) "
                                     "and fell back to the CPU")
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads
        if device.type == "cuda" and precision == "int8":
            # ONNX Runtime's CUDA provider has no INT8 convolution: it dequantizes the Q/DQ graph and convolves in
            # float, so this row times the Q/DQ graph in float, not INT8 inference (TensorRT's int8 rows are that).
            self.computes_in = "float (Q/DQ dequantized: no INT8 convolutions in ONNX Runtime's CUDA provider)"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(np.float32, copy=False)})[0]

    def device_compute_ms(self, images, iterations, warmup):
        if self.device != "cuda":
            return None
        # IO binding keeps input and output on the GPU, so this times compute without host copies.
        index = cuda_index(self.torch_device)
        with torch.cuda.stream(self.stream):
            device_input = torch.from_numpy(images.astype(np.float32, copy=False)).to(self.torch_device)
        self.stream.synchronize()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, np.float32, list(device_input.shape), device_input.data_ptr())
        binding.bind_output(self.session.get_outputs()[0].name, "cuda", index)
        return _cuda_event_times(lambda: self.session.run_with_iobinding(binding), iterations, warmup, self.stream)


def torch_dtype(trt, tensor_type) -> torch.dtype:
    """The PyTorch dtype of a TensorRT tensor type (engine.get_tensor_dtype), whichever TensorRT version has it."""
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, dtype in names.items():
        if getattr(trt.DataType, name, None) == tensor_type:
            return dtype
    raise BackendUnavailable(f"the engine has a {tensor_type} input or output, which dfad-edge cannot feed or read")


class TensorRTBackend(InferenceBackend):
    """An engine run on a CUDA stream of its own, with the optimisation profile tuned for each batch size.

    Input and output buffers take the engine's own tensor types, and the buffers bound to the context stay
    referenced until the next binding replaces them: TensorRT reads and writes them asynchronously on the stream."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, precision: str, device: torch.device):
        from ..export.tensorrt_build import LoadedEngine, check_engine_compatible, cuda_gpu, import_tensorrt

        try:
            trt = import_tensorrt()
        except DfadError:
            raise BackendUnavailable("TensorRT is not installed (pip install 'dfad-edge[tensorrt]' on a GPU machine; "
                                     "JetPack's system TensorRT on a Jetson)") from None
        if not engine_path.is_file():
            raise BackendUnavailable(f"{engine_path.name} not found (run dfad-edge build-engines on this machine)")
        try:
            check_engine_compatible(engine_path, trt.__version__, cuda_gpu(device))
            with torch.cuda.device(device):  # deserialized, and later run, on the GPU bench was given
                self.trt_engine = LoadedEngine(engine_path, trt)
                self.stream = torch.cuda.Stream(device=device)
        except DfadError as exc:
            raise BackendUnavailable(str(exc)) from None
        self.precision, self.device, self.artifact, self.torch_device = precision, "cuda", engine_path, device
        engine = self.trt_engine.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_dtype = torch_dtype(trt, engine.get_tensor_dtype(self.input_name))
        self.output_dtype = torch_dtype(trt, engine.get_tensor_dtype(self.output_name))
        # (min, opt, max) batch of each optimisation profile, as the engine holds them.
        self.profiles = [tuple(int(shape[0]) for shape in engine.get_tensor_profile_shape(self.input_name, index))
                         for index in range(engine.num_optimization_profiles)]
        self.max_batch = max(largest for _, _, largest in self.profiles)
        self.active_profile: int | None = None
        self.bound: tuple[torch.Tensor, torch.Tensor] | None = None

    def profile_for(self, batch_size: int) -> int:
        """The profile tuned for this batch size (opt == batch) or else the one tuned nearest to it."""
        serving = [i for i, (smallest, _, largest) in enumerate(self.profiles) if smallest <= batch_size <= largest]
        if not serving:
            raise DfadError(f"no optimisation profile of {self.artifact.name} serves batch {batch_size} "
                            f"(profiles {self.profiles}); rebuild with dfad-edge build-engines --max-batch")
        return min(serving, key=lambda i: abs(self.profiles[i][1] - batch_size))

    def _call(self, call: str, *args, what: str = "") -> None:
        """One execution-context call, checked: TensorRT's Python API reports these failures by returning False, not
        by raising, and logits read after an unchecked failure are whatever the output buffer held."""
        if not getattr(self.trt_engine.context, call)(*args):
            raise DfadError(f"TensorRT {call}({what}) failed on {self.artifact.name} (see the TensorRT log above); "
                            "no output of it was used")

    def _bind(self, device_input: torch.Tensor) -> torch.Tensor:
        profile = self.profile_for(device_input.shape[0])
        if profile != self.active_profile:
            self._call("set_optimization_profile_async", profile, self.stream.cuda_stream, what=f"profile {profile}")
            self.active_profile = profile
        shape = tuple(device_input.shape)
        self._call("set_input_shape", self.input_name, shape, what=f"{self.input_name}, {shape}")
        output = torch.empty(tuple(self.trt_engine.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                             device=self.torch_device)
        self._call("set_tensor_address", self.input_name, device_input.data_ptr(), what=self.input_name)
        self._call("set_tensor_address", self.output_name, output.data_ptr(), what=self.output_name)
        self.bound = (device_input, output)
        return output

    def _device_input(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).to(self.torch_device, dtype=self.input_dtype)

    def predict(self, images: np.ndarray) -> np.ndarray:
        # Copies, execution and the copy back are all enqueued on the engine's stream, in that order.
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            output = self._bind(self._device_input(images))
            self._call("execute_async_v3", self.stream.cuda_stream)
            logits = output.float().cpu()
        return logits.numpy()

    def device_compute_ms(self, images, iterations, warmup):
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            self._bind(self._device_input(images))
            return _cuda_event_times(lambda: self._call("execute_async_v3", self.stream.cuda_stream),
                                     iterations, warmup, self.stream)
