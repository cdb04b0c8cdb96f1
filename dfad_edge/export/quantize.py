"""Static post-training INT8 quantization into QDQ graphs with ONNX Runtime, in two flavours:

- ``tensorrt``: symmetric signed activations and weights, per-channel weights, every zero-point 0, Q/DQ on the
  inputs of convolutions and on the skip input of residual Adds only (qdq_placement.py), no Q/DQ on outputs, and FP16
  outside the Q/DQ pairs with FP32 at the boundary (fp16_typing.py): what TensorRT's explicit quantization accepts
  and fuses into Conv+Add+ReLU INT8 kernels.
- ``cpu``: unsigned 8-bit activations with a zero-point (U8S8), per-channel signed weights: what ONNX Runtime's
  x86 kernels run fastest (the TensorRT form is slower than FP32 on a CPU; see benchmarks/ort_int8_latency.py).

NVIDIA's ModelOpt can make the TensorRT graph instead (``quantizer="modelopt"``, modelopt_quantize.py); the CPU graph
is always ONNX Runtime's, and the rule checker checks the TensorRT graph whoever made it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

from ..errors import DfadError
from .calibration import TensorCalibrationReader
from .fp16_typing import type_fp16_outside_qdq
from .modelopt_quantize import modelopt_int8_graph
from .onnx_export import INPUT_NAME, read_metadata, set_metadata
from .qdq_placement import place_residual_qdq
from .qdq_rules import boundary_layers, tensorrt_qdq_violations

FLAVOURS = ("tensorrt", "cpu")
QUANTIZERS = ("ort", "modelopt")  # who makes the TensorRT graph; the CPU graph is always ONNX Runtime's


def quantization_options(flavour: str) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType

    common = {"quant_format": QuantFormat.QDQ, "per_channel": True, "reduce_range": False,
              "weight_type": QuantType.QInt8}
    if flavour == "tensorrt":
        return {**common, "activation_type": QuantType.QInt8,
                # Float biases: TensorRT's ONNX parser rejects int32 bias DequantizeLinear nodes. Q/DQ on inputs
                # only: TensorRT quantizes a layer's output through the next layer's input Q/DQ, and a pair between
                # a Conv and its ReLU or Add keeps them from fusing.
                "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                  "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS}}
    if flavour == "cpu":
        return {**common, "activation_type": QuantType.QUInt8,
                "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True}}
    raise DfadError(f"unknown INT8 flavour '{flavour}': use {', '.join(FLAVOURS)}")


QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add"]


def first_and_last_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the stem and the classifier, which quantizers are told to leave in float (qdq_rules checks that
    they did)."""
    return list(dict.fromkeys(node.name for node in boundary_layers(model.graph).values()))


def ort_qdq_graph(fp32_path: Path, calibration_images: torch.Tensor, flavour: str,
                  calibrate_method: str = "minmax") -> onnx.ModelProto:
    """ONNX Runtime's QDQ graph of this flavour, as its quantizer writes it."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise DfadError(f"unknown calibration method '{calibrate_method}': use {', '.join(methods)}")
    with tempfile.TemporaryDirectory() as scratch:
        # Pre-processing folds BatchNorm into Conv and infers shapes, so only Conv/Gemm/Add get quantized.
        preprocessed, quantized = Path(scratch) / "pre.onnx", Path(scratch) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(preprocessed), skip_symbolic_shape=True)
        reader = TensorCalibrationReader(calibration_images, INPUT_NAME)
        excluded = first_and_last_layers(onnx.load(str(preprocessed)))
        quantize_static(str(preprocessed), str(quantized), reader, calibrate_method=methods[calibrate_method],
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded, **quantization_options(flavour))
        return onnx.load(str(quantized))


def check_tensorrt_rules(model: onnx.ModelProto, what: str) -> None:
    violations = tensorrt_qdq_violations(model)
    if violations:
        raise DfadError(f"{what} breaks TensorRT's rules ({len(violations)}): " + "; ".join(violations[:5]))


def tensorrt_int8_graph(fp32_path: Path, calibration_images: torch.Tensor, calibrate_method: str = "minmax",
                        quantizer: str = "ort") -> onnx.ModelProto:
    """The INT8 graph TensorRT builds from: NVIDIA's Q/DQ placement, FP16 outside the Q/DQ pairs, checked."""
    if quantizer == "modelopt":
        float_nodes = first_and_last_layers(onnx.load(str(fp32_path)))
        model = modelopt_int8_graph(fp32_path, calibration_images, calibrate_method, float_nodes)
    elif quantizer == "ort":
        model = ort_qdq_graph(fp32_path, calibration_images, "tensorrt", calibrate_method)
        place_residual_qdq(model)
        model = type_fp16_outside_qdq(model)
    else:
        raise DfadError(f"unknown INT8 quantizer '{quantizer}': use {', '.join(QUANTIZERS)}")
    check_tensorrt_rules(model, f"the TensorRT INT8 graph from {quantizer}")
    return model


def quantize_int8(fp32_path: Path, out_path: Path, calibration_images: torch.Tensor, flavour: str,
                  calibrate_method: str = "minmax", quantizer: str = "ort") -> Path:
    """Write the INT8 graph of this flavour, with the FP32 graph's metadata (input spec, classes) and its own."""
    if flavour == "tensorrt":
        model = tensorrt_int8_graph(fp32_path, calibration_images, calibrate_method, quantizer)
    else:
        model = ort_qdq_graph(fp32_path, calibration_images, flavour, calibrate_method)
    source_metadata = read_metadata(fp32_path)
    set_metadata(model, {**source_metadata, "dfad_edge.precision": "int8", "dfad_edge.int8_flavour": flavour,
                         "dfad_edge.int8_quantizer": quantizer if flavour == "tensorrt" else "ort"})
    onnx.save(model, str(out_path))
    return out_path
