"""NVIDIA's Q/DQ placement on residual Adds, applied to ONNX Runtime's QDQ graph for TensorRT.

TensorRT fuses Conv + Add (+ ReLU) into one INT8 kernel when the Add's skip input arrives through a Q/DQ pair and
the convolution's output enters the Add unquantized (TensorRT developer guide, "Q/DQ layer placement"; ModelOpt and
NVIDIA's quantization toolkits place them so in ResNets). ONNX Runtime's quantizer puts a Q/DQ pair on both Add
inputs; the pair on the convolution branch makes TensorRT write the convolution's output in INT8, read it back and
run the Add as a layer of its own.

The skip input is the block input (identity), a parameter-free option-A shortcut (Slice + Pad in CIFAR ResNets) or a
projection (1x1 Conv + BatchNorm, folded into the Conv). When both inputs come from convolutions, the one with more
convolutions behind it is the residual branch and is fused; the projection's output keeps its Q/DQ pair (ModelOpt
decides the same way, by the longer path to the common ancestor).
"""

from __future__ import annotations

import onnx

from .qdq_rules import producer_map, skip_qdq_pair

FUSIBLE_OPS = ("Conv",)


def conv_depths(graph: onnx.GraphProto) -> dict[str, int]:
    """For every tensor, the most convolutions on any path from the graph inputs to it (nodes are in topological
    order, as ONNX requires)."""
    depth: dict[str, int] = {}
    for node in graph.node:
        node_depth = max((depth.get(name, 0) for name in node.input if name), default=0)
        node_depth += node.op_type in FUSIBLE_OPS
        for output in node.output:
            depth[output] = node_depth
    return depth


def fused_input(node: onnx.NodeProto, producers: dict, depth: dict[str, int], constants: set[str]) -> int | None:
    """Which input of this Add TensorRT should fuse into the convolution that produced it (None: not a residual
    join of a convolution's output, nothing to change)."""
    activations = [i for i, name in enumerate(node.input) if name and name not in constants]
    if len(activations) != 2:
        return None
    from_conv = [i for i in activations
                 if (producer := producers.get(skip_qdq_pair(node.input[i], producers))) is not None
                 and producer.op_type in FUSIBLE_OPS]
    if not from_conv:
        return None
    return max(from_conv, key=lambda i: depth[skip_qdq_pair(node.input[i], producers)])


def remove_unused_qdq(graph: onnx.GraphProto) -> None:
    """Drop Q/DQ nodes nobody reads any more, and the scales and zero-points only they used."""
    graph_outputs = {output.name for output in graph.output}
    released: set[str] = set()
    while True:
        consumed = {name for node in graph.node for name in node.input} | graph_outputs
        unused = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not any(output in consumed for output in node.output)]
        if not unused:
            break
        for node in unused:
            released.update(node.input)
            graph.node.remove(node)
    consumed = {name for node in graph.node for name in node.input}
    for initializer in [init for init in graph.initializer if init.name in released - consumed]:
        graph.initializer.remove(initializer)


def place_residual_qdq(model: onnx.ModelProto) -> list[str]:
    """Rewire every residual Add so its convolution branch enters unquantized; returns the Adds changed."""
    graph = model.graph
    producers = producer_map(graph)
    depth = conv_depths(graph)
    constants = {init.name for init in graph.initializer}
    changed = []
    for node in graph.node:
        if node.op_type != "Add":
            continue
        index = fused_input(node, producers, depth, constants)
        if index is None:
            continue
        convolution_output = skip_qdq_pair(node.input[index], producers)
        if convolution_output != node.input[index]:
            node.input[index] = convolution_output
            changed.append(node.name)
    remove_unused_qdq(graph)
    return changed
