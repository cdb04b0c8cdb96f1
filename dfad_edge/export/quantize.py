"""Static post-training INT8 quantization into QDQ graphs with ONNX Runtime, in two flavours:

- ``tensorrt``: symmetric signed activations and weights, per-channel weights, every zero-point 0, Q/DQ on both
  inputs of residual Adds: what TensorRT's explicit quantization accepts and fuses.
- ``cpu``: unsigned 8-bit activations with a zero-point (U8S8), per-channel signed weights: what ONNX Runtime's
  x86 kernels run fastest (the TensorRT form is slower than FP32 on a CPU; see benchmarks/ort_int8_latency.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

from ..errors import DfadError
from .calibration import TensorCalibrationReader
from .onnx_export import INPUT_NAME
from .qdq_rules import tensorrt_qdq_violations

FLAVOURS = ("tensorrt", "cpu")


def quantization_options(flavour: str) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType

    common = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": False,
              "weight_type": QuantType.QInt8}
    if flavour == "tensorrt":
        return {**common, "activation_type": QuantType.QInt8,
                # Float biases: TensorRT's ONNX parser rejects int32 bias DequantizeLinear nodes.
                "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}}
    if flavour == "cpu":
        return {**common, "activation_type": QuantType.QUInt8,
                "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True}}
    raise DfadError(f"unknown INT8 flavour '{flavour}': use {', '.join(FLAVOURS)}")


QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add"]


def first_and_last_layers(model: onnx.ModelProto) -> list[str]:
    """The stem convolution and the classifier: the layers most sensitive to INT8 (kept in float, as is usual).
    Measured on the shared ResNet-56: all-INT8 loses 3.7 points of top-1, this 0.2."""
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    classifiers = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    return convs[:1] + classifiers[-1:]


def quantize_int8(fp32_path: Path, out_path: Path, calibration_images: torch.Tensor, flavour: str,
                  calibrate_method: str = "minmax", keep_first_last_float: bool = True) -> Path:
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise DfadError(f"unknown calibration method '{calibrate_method}': use {', '.join(methods)}")
    with tempfile.TemporaryDirectory() as scratch:
        # Pre-processing folds BatchNorm into Conv and infers shapes, so only Conv/Gemm/Add get quantized.
        preprocessed = Path(scratch) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(preprocessed), skip_symbolic_shape=True)
        reader = TensorCalibrationReader(calibration_images, INPUT_NAME)
        excluded = first_and_last_layers(onnx.load(str(preprocessed))) if keep_first_last_float else []
        quantize_static(str(preprocessed), str(out_path), reader, calibrate_method=methods[calibrate_method],
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded, **quantization_options(flavour))
    if flavour == "tensorrt":
        violations = tensorrt_qdq_violations(onnx.load(str(out_path)))
        if violations:
            out_path.unlink()
            raise DfadError(f"the TensorRT-flavour INT8 graph breaks TensorRT's rules ({len(violations)}): "
                            + "; ".join(violations[:5]))
    return out_path
