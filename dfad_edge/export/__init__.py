"""Stage 2: export to ONNX (FP32, FP16), INT8 QDQ graphs and TensorRT engines."""

from .pipeline import ENGINE_FILES, ONNX_FILES, ExportOptions, run_export

__all__ = ["ENGINE_FILES", "ONNX_FILES", "ExportOptions", "run_export"]
