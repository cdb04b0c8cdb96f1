"""Stage 2: export to ONNX (FP32, FP16), INT8 QDQ graphs and TensorRT engines."""

from .folder import CHECKPOINT_FILE, ENGINE_FILES, ONNX_FILES
from .pipeline import ExportOptions, run_export

__all__ = ["CHECKPOINT_FILE", "ENGINE_FILES", "ONNX_FILES", "ExportOptions", "run_export"]
