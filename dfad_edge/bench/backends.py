"""One inference-backend interface, so accuracy and latency are written once for PyTorch, ONNX Runtime and TensorRT.

A backend takes a normalised float32 batch (numpy, N x C x H x W) and returns logits (numpy). On CUDA,
``device_compute_ms`` times the compute alone with CUDA events, inputs already on the device.
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

    @abstractmethod
    def predict(self, images: np.ndarray) -> np.ndarray:
        """End to end: host batch in, host logits out (copies included)."""

    def device_compute_ms(self, images: np.ndarray, iterations: int, warmup: int) -> list[float] | None:
        """GPU compute time per call with inputs already on the device; None on a CPU."""
        return None

    def peak_device_memory_bytes(self) -> int | None:
        return None


def _cuda_event_times(run, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


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
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.threads = torch.get_num_threads()

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images).to(self.torch_device, dtype=self.dtype)
        return self.model(batch).float().cpu().numpy()

    @torch.inference_mode()
    def device_compute_ms(self, images, iterations, warmup):
        if self.device != "cuda":
            return None
        batch = torch.from_numpy(images).to(self.torch_device, dtype=self.dtype)
        return _cuda_event_times(lambda: self.model(batch), iterations, warmup)

    def peak_device_memory_bytes(self):
        return torch.cuda.max_memory_allocated(self.torch_device) if self.device == "cuda" else None


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, path: Path, precision: str, device: torch.device):
        import onnxruntime as ort

        if not path.is_file():
            raise BackendUnavailable(f"{path.name} not found (run dfad-edge export{' --int8' if precision == 'int8' else ''}"
                                     f"{' --fp16' if precision == 'fp16' else ''})")
        available = ort.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        # On a CPU: the same thread count as PyTorch, so CPU rows compare like with like.
        threads = torch.get_num_threads() if device.type == "cpu" else None
        try:
            self.session = ort_session(path, providers, threads)
        except Exception as exc:  # noqa: BLE001 - an unsupported graph on this provider is a skip, not a crash
            raise BackendUnavailable(f"onnxruntime cannot load {path.name} on {providers[0]}: {str(exc)[:200]}") from None
        self.precision, self.device, self.artifact = precision, device.type, path
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(np.float32, copy=False)})[0]

    def device_compute_ms(self, images, iterations, warmup):
        if self.device != "cuda":
            return None
        # IO binding keeps input and output on the GPU, so this times compute without host copies.
        binding = self.session.io_binding()
        device_input = torch.from_numpy(images).cuda()
        binding.bind_input(self.input_name, "cuda", 0, np.float32, list(device_input.shape), device_input.data_ptr())
        binding.bind_output(self.session.get_outputs()[0].name, "cuda")
        return _cuda_event_times(lambda: self.session.run_with_iobinding(binding), iterations, warmup)


class TensorRTBackend(InferenceBackend):
    name = "tensorrt"

    def __init__(self, engine_path: Path, precision: str, device: torch.device):
        from ..export.tensorrt_build import check_engine_compatible, cuda_gpu, import_tensorrt

        try:
            trt = import_tensorrt()
        except DfadError:
            raise BackendUnavailable("TensorRT is not installed (pip install 'dfad-edge[tensorrt]' on a GPU machine; "
                                     "JetPack's system TensorRT on a Jetson)") from None
        if device.type != "cuda":
            raise BackendUnavailable("TensorRT needs a CUDA GPU (bench --device cuda)")
        try:
            gpu = cuda_gpu()
        except DfadError as exc:
            raise BackendUnavailable(str(exc).split(". ")[0]) from None
        if not engine_path.is_file():
            raise BackendUnavailable(f"{engine_path.name} not found (run dfad-edge export --tensorrt on this machine)")
        try:
            sidecar = check_engine_compatible(engine_path, trt.__version__, gpu)
        except DfadError as exc:
            raise BackendUnavailable(str(exc)) from None
        self.max_batch = sidecar["batch_range"][-1]
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {engine_path.name}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.precision, self.device, self.artifact = precision, "cuda", engine_path

    def _bind(self, device_input: torch.Tensor) -> torch.Tensor:
        self.context.set_input_shape(self.input_name, tuple(device_input.shape))
        output = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, device_input.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        return output

    def predict(self, images: np.ndarray) -> np.ndarray:
        device_input = torch.from_numpy(images).cuda()
        output = self._bind(device_input)
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return output.cpu().numpy()

    def device_compute_ms(self, images, iterations, warmup):
        device_input = torch.from_numpy(images).cuda()
        self._bind(device_input)
        stream = torch.cuda.current_stream().cuda_stream
        return _cuda_event_times(lambda: self.context.execute_async_v3(stream), iterations, warmup)
