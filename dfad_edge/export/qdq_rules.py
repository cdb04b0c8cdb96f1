"""TensorRT's explicit-quantization rules, checked on a QDQ ONNX graph before anyone builds an engine from it.

TensorRT (10 and 11) rejects non-zero zero-points and unsigned INT8 and needs per-tensor activation scales. It fuses
a residual Add into the INT8 convolution that feeds it (Conv+Add+ReLU, one kernel) only when the skip input arrives
through a Q/DQ pair and the convolution's output enters the Add unquantized (TensorRT developer guide, "Q/DQ layer
placement"): a Q/DQ pair on the convolution branch, or none on the skip input, leaves the Add as a layer of its own.
This checker is independent of how the graph was made (ONNX Runtime plus qdq_placement.py, or ModelOpt).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _constant_outputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def skip_qdq_pair(tensor_name: str, producers: dict) -> str:
    """The tensor before a QuantizeLinear -> DequantizeLinear pair (the name itself when there is none)."""
    dequantize = _dequantized(tensor_name, producers)
    quantize = producers.get(dequantize.input[0]) if dequantize is not None else None
    return quantize.input[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else tensor_name


def tensorrt_qdq_violations(model: onnx.ModelProto) -> list[str]:
    """Every way this graph breaks TensorRT's explicit-quantization rules (empty list: it complies)."""
    constants = {**_initializers(model), **_constant_outputs(model)}
    producers = producer_map(model.graph)
    violations: list[str] = []
    qdq_nodes = [n for n in model.graph.node if n.op_type in QDQ_OPS]
    if not qdq_nodes:
        return ["no QuantizeLinear/DequantizeLinear nodes: this is not an explicitly quantized (QDQ) graph"]
    for node in qdq_nodes:
        violations += _zero_point_violations(node, constants)
        violations += _scale_violations(node, constants)
    violations += _boundary_layer_violations(model.graph, producers)
    for node in model.graph.node:
        if node.op_type == "Conv":
            violations += _conv_violations(node, producers, constants)
        elif node.op_type == "Add":
            violations += _residual_add_violations(node, producers, constants)
    return violations


def _zero_point_violations(node: onnx.NodeProto, constants: dict) -> list[str]:
    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear":
            # The ONNX spec makes a QuantizeLinear without a zero-point produce uint8, which TensorRT refuses.
            return [f"{node.name}: QuantizeLinear without a zero-point (uint8 by the ONNX spec; TensorRT needs an "
                    "explicit int8 zero-point of 0)"]
        quantized = constants.get(node.input[0])  # a DequantizeLinear reads its input's type
        if quantized is not None and quantized.dtype != np.int8:
            return [f"{node.name}: DequantizeLinear of {quantized.dtype} weights (TensorRT needs signed int8)"]
        return []
    zero_point = constants.get(node.input[2])
    if zero_point is None:
        return [f"{node.name}: zero-point is not a constant"]
    problems = []
    if zero_point.dtype == np.int32:
        problems.append(f"{node.name}: int32 (bias) DequantizeLinear, which TensorRT's parser rejects; keep biases float")
    elif zero_point.dtype != np.int8:
        problems.append(f"{node.name}: zero-point type {zero_point.dtype} (TensorRT needs signed int8)")
    if np.any(zero_point != 0):
        problems.append(f"{node.name}: non-zero zero-point {zero_point.flatten()[:4].tolist()}")
    return problems


def boundary_layers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The stem and the classifier: the first and last Conv/Gemm/MatMul in graph order, found by position rather
    than by name, so a quantizer that renames nodes cannot slip past. They stay in float: all-INT8 cost the shared
    ResNet-56 3.7 points of top-1, float ends 0.2."""
    layers = [node for node in graph.node if node.op_type in LINEAR_OPS]
    return {"stem": layers[0], "classifier": layers[-1]} if layers else {}


def _boundary_layer_violations(graph: onnx.GraphProto, producers: dict) -> list[str]:
    return [f"{role} {node.op_type} {node.name}: quantized (dfad-edge keeps the first and last layers in float; "
            "exclude it from quantization)"
            for role, node in boundary_layers(graph).items()
            if any(_dequantized(name, producers) for name in node.input[:2])]


def _scale_violations(node: onnx.NodeProto, constants: dict) -> list[str]:
    scale = constants.get(node.input[1])
    if scale is None:
        return [f"{node.name}: scale is not a constant"]
    if np.any(scale <= 0):
        return [f"{node.name}: non-positive scale"]
    return []


def _is_weight(tensor_name: str, producers: dict, constants: dict) -> bool:
    """A weight is a constant, possibly behind a DequantizeLinear whose input is constant."""
    if tensor_name in constants:
        return True
    producer = producers.get(tensor_name)
    return producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in constants


def _dequantized(tensor_name: str, producers: dict) -> onnx.NodeProto | None:
    producer = producers.get(tensor_name)
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _conv_violations(node: onnx.NodeProto, producers: dict, constants: dict) -> list[str]:
    activation_dq = _dequantized(node.input[0], producers)
    weight_dq = _dequantized(node.input[1], producers)
    if activation_dq is None and weight_dq is None:
        return []  # kept in float on purpose (first and last layers): TensorRT runs it in FP16/FP32
    if activation_dq is None or weight_dq is None:
        missing = "input activation" if activation_dq is None else "weight"
        return [f"Conv {node.name}: half-quantized, its {missing} has no Q/DQ"]
    problems = []
    activation_scale = constants.get(activation_dq.input[1])
    if activation_scale is not None and activation_scale.size != 1:
        problems.append(f"Conv {node.name}: activation scale is not per-tensor")
    weight_scale = constants.get(weight_dq.input[1])
    out_channels = constants[weight_dq.input[0]].shape[0] if weight_dq.input[0] in constants else None
    if weight_scale is not None and out_channels and out_channels > 1 and weight_scale.size != out_channels:
        problems.append(f"Conv {node.name}: weight scale is not per-channel ({weight_scale.size} for {out_channels})")
    return problems


def _source_op(tensor_name: str, producers: dict) -> str | None:
    producer = producers.get(skip_qdq_pair(tensor_name, producers))
    return producer.op_type if producer is not None else None


def _residual_add_violations(node: onnx.NodeProto, producers: dict, constants: dict) -> list[str]:
    activation_inputs = [name for name in node.input if not _is_weight(name, producers, constants)]
    if len(activation_inputs) < 2:
        return []  # a bias add, not a residual join
    if not any(_source_op(name, producers) == "Conv" for name in activation_inputs):
        return []  # joins no convolution output: nothing for TensorRT to fuse it into
    quantized = [name for name in activation_inputs if _dequantized(name, producers) is not None]
    unquantized = [name for name in activation_inputs if name not in quantized]
    if not unquantized:
        return [f"residual Add {node.name}: Q/DQ on every input {quantized}; the convolution branch must enter "
                "unquantized so TensorRT fuses Conv+Add into one INT8 kernel"]
    if not quantized:
        return [f"residual Add {node.name}: its skip input has no Q/DQ, so TensorRT cannot fuse the Add into the "
                "INT8 convolution"]
    not_fusible = [name for name in unquantized if _source_op(name, producers) != "Conv"]
    if not_fusible:
        return [f"residual Add {node.name}: unquantized input(s) {not_fusible} come from no convolution, so nothing "
                "fuses them; quantize the skip input and leave only the convolution's output unquantized"]
    return []


def _fuses_into_conv(node: onnx.NodeProto, producers: dict, constants: dict) -> bool:
    """A residual Add in NVIDIA's placement: one input through Q/DQ, the other straight from a convolution."""
    activation_inputs = [name for name in node.input if not _is_weight(name, producers, constants)]
    direct = [name for name in activation_inputs if _dequantized(name, producers) is None]
    return (len(activation_inputs) == 2 and len(direct) == 1 and producers.get(direct[0]) is not None
            and producers[direct[0]].op_type == "Conv")


def intended_precisions(model: onnx.ModelProto) -> dict:
    """The precision each kind of layer is meant to run in on TensorRT, read from the graph: a Conv/Gemm/MatMul
    with Q/DQ on its activation and weight runs in INT8, a residual Add in NVIDIA's placement runs inside the INT8
    convolution before it, every other layer in the graph's float type (a strongly typed network follows the
    graph; TensorRT still fuses a ReLU into the INT8 kernel before it). Q/DQ and the boundary Casts are left out;
    inputs and outputs are listed with their own types."""
    graph = model.graph
    producers = producer_map(graph)
    constants = {**_initializers(model), **_constant_outputs(model)}
    float_type = "fp16" if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer) else "fp32"
    layers: dict[str, Counter] = {}
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.op_type == "Cast":
            continue
        if node.op_type in LINEAR_OPS and all(_dequantized(name, producers) for name in node.input[:2]):
            precision = "int8"
        elif node.op_type == "Add" and _fuses_into_conv(node, producers, constants):
            precision = "int8, fused into the convolution"
        else:
            precision = float_type
        layers.setdefault(node.op_type, Counter())[precision] += 1
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    boundary = {tensor.name: names.get(tensor.type.tensor_type.elem_type, "other")
                for tensor in [*graph.input, *graph.output]}
    return {"inputs_outputs": boundary, "layers": {op: dict(counts) for op, counts in layers.items()}}


def qdq_summary(model: onnx.ModelProto) -> dict:
    counts = Counter(node.op_type for node in model.graph.node)
    producers = producer_map(model.graph)
    float_convs = [n.name for n in model.graph.node if n.op_type == "Conv" and _dequantized(n.input[0], producers) is None]
    return {"float_convs": len(float_convs),"quantize_linear": counts["QuantizeLinear"], "dequantize_linear": counts["DequantizeLinear"],
            "conv": counts["Conv"], "add": counts["Add"], "nodes": sum(counts.values())}
