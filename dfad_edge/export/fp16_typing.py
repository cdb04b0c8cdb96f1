"""FP16 outside the Q/DQ pairs, FP32 at the boundary: the TensorRT INT8 graph typed as ModelOpt types it
(``high_precision_dtype="fp16"``).

TensorRT 11 builds only strongly typed networks (10 does with STRONGLY_TYPED, which the builder sets), and there
every layer runs in the type the graph gives it: in an FP32-typed QDQ graph the stem, the classifier and every layer
TensorRT does not fuse into an INT8 kernel run in FP32. Here every float tensor inside the graph becomes FP16
(weights and biases kept in float, Q/DQ scales, activations); the input is cast to FP16 on entry and the logits back
to FP32 on exit, so callers feed and read FP32 as before.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import DfadError

# DequantizeLinear takes FP16 scales (and returns FP16) from opset 19 on.
MIN_OPSET = 19
FP16_SUFFIX = "_fp16"


def _to_fp16(array: np.ndarray, name: str) -> np.ndarray:
    """Refuse a value beyond FP16's range. (A Q/DQ scale that underflows to 0 is caught by the rule checker.)"""
    half = array.astype(np.float16)
    if np.any(np.isinf(half) & np.isfinite(array)):
        raise DfadError(f"{name} does not fit in FP16 (range {float(array.min()):.3g}..{float(array.max()):.3g}); "
                        "this model cannot be typed FP16 outside its Q/DQ pairs")
    return half


def _requantize_weights_to_fp16_scales(graph: onnx.GraphProto) -> None:
    """Give each INT8 weight its FP16 scale and requantize it to that scale, so the dequantized weights stay what
    calibration made them. Folding BatchNorm leaves near-dead channels whose scales (1e-8 in the shared ResNet-56)
    FP16 rounds by up to 50% or to zero; keeping the INT8 values would scale those channels' weights with it."""
    initializers = {init.name: init for init in graph.initializer}
    smallest = np.finfo(np.float16).smallest_subnormal
    for node in graph.node:
        weight = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        scale = initializers.get(node.input[1]) if weight is not None else None
        if scale is None or weight.data_type != TensorProto.INT8 or scale.data_type != TensorProto.FLOAT:
            continue
        values, scales = numpy_helper.to_array(weight), numpy_helper.to_array(scale)
        half = np.maximum(_to_fp16(scales, scale.name), smallest)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        ratio = (scales / half.astype(np.float32)).reshape([-1 if d == axis % values.ndim and scales.size > 1 else 1
                                                            for d in range(values.ndim)])
        requantized = np.clip(np.round(values * ratio), -128, 127).astype(np.int8)
        weight.CopyFrom(numpy_helper.from_array(requantized, weight.name))
        scale.CopyFrom(numpy_helper.from_array(half, scale.name))


def _type_constants(graph: onnx.GraphProto) -> None:
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(initializer)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(_to_fp16(array, initializer.name), initializer.name))
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(attribute.t), node.output[0])))
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _cast_at_the_boundary(graph: onnx.GraphProto) -> None:
    """FP32 graph inputs are cast to FP16 first thing; FP32 graph outputs are cast back from FP16 last thing."""
    entry_casts = []
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_input(graph, graph_input.name, graph_input.name + FP16_SUFFIX)
            entry_casts.append(onnx.helper.make_node("Cast", [graph_input.name], [graph_input.name + FP16_SUFFIX],
                                                     name=graph_input.name + "_cast_to_fp16", to=TensorProto.FLOAT16))
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type == TensorProto.FLOAT:
            inside = graph_output.name + FP16_SUFFIX
            _rename_input(graph, graph_output.name, inside)
            for node in graph.node:
                node.output[:] = [inside if name == graph_output.name else name for name in node.output]
            graph.node.append(onnx.helper.make_node("Cast", [inside], [graph_output.name],
                                                    name=graph_output.name + "_cast_to_fp32", to=TensorProto.FLOAT))
    for position, cast in enumerate(entry_casts):
        graph.node.insert(position, cast)


def _with_min_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    default_domain = next(opset for opset in model.opset_import if opset.domain in ("", "ai.onnx"))
    if default_domain.version >= MIN_OPSET:
        return model
    return onnx.version_converter.convert_version(model, MIN_OPSET)


def type_fp16_outside_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with FP16 everywhere but its inputs, outputs and the INT8 side of its Q/DQ pairs."""
    model = _with_min_opset(model)
    graph = model.graph
    _requantize_weights_to_fp16_scales(graph)
    _type_constants(graph)
    _cast_at_the_boundary(graph)
    del graph.value_info[:]  # FP32 types recorded by earlier shape inference; re-inferred below
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DfadError(f"typing the INT8 graph FP16 outside its Q/DQ pairs made an invalid graph: {exc}") from None
    return model


def fp16_storage_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that rounds every tensor the FP16-typed graph holds in FP16 to FP16 after each layer: FP16
    storage with FP32 arithmetic, as TensorRT's FP16 kernels mostly compute. ONNX Runtime's CPU provider runs this
    the same in every version, while it runs an FP16-typed QDQ graph in FP32 between casts, and some versions wrongly
    (1.24.4: 54% top-1 agreement with FP32 on the ResNet-56; 1.30 and 1.32: 97%)."""
    model = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    graph = model.graph
    fp16_tensors = {info.name for info in graph.value_info if info.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.FLOAT16:
            exact = numpy_helper.to_array(initializer).astype(np.float32)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(exact, initializer.name))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
            if node.op_type == "Constant" and attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float32)))
        rounding = []
        for index, output in enumerate(node.output):
            if output in fp16_tensors:
                node.output[index] = output + "_exact"
                rounding += [onnx.helper.make_node("Cast", [output + "_exact"], [output + "_half"], to=TensorProto.FLOAT16),
                             onnx.helper.make_node("Cast", [output + "_half"], [output], to=TensorProto.FLOAT)]
        nodes += [node, *rounding]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model
