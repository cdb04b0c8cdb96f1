import importlib.util
import json
import os
import textwrap

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from dfad_edge.checkpoint import InputSpec, load_checkpoint, model_checkpoint
from dfad_edge.errors import DfadError
from dfad_edge.export import ExportOptions, run_export
from dfad_edge.export.fp16_typing import type_fp16_outside_qdq
from dfad_edge.export.onnx_export import export_onnx, ort_session, read_metadata, run_onnx, verify_against_torch
from dfad_edge.export.qdq_rules import tensorrt_qdq_violations
from dfad_edge.export.quantize import ort_qdq_graph, quantize_int8
from dfad_edge.models import create_model
from dfad_edge.models.resnet_8x import projection_block

RGB = InputSpec(3, 32, 32, [0.5] * 3, [0.25] * 3)


@pytest.fixture(scope="module")
def teacher_export(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-teacher")
    result = run_cli("export", digits_teacher, "--out", out, "--int8", "--fp16", "--calib", "digits", "--max-batch", "32")
    assert result.exit_code == 0, result.output
    return out


def test_onnx_carries_the_input_spec_and_runs_any_batch(teacher_export, digits_teacher):
    metadata = read_metadata(teacher_export / "model.onnx")
    spec = json.loads(metadata["dfad_edge.input_spec"])
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 8, 8)
    assert json.loads(metadata["dfad_edge.class_names"])[7] == "7" and metadata["dfad_edge.max_batch"] == "32"
    model = load_checkpoint(digits_teacher).build_model()
    session = ort_session(teacher_export / "model.onnx")
    for batch in (1, 3, 32):
        images = torch.randn(batch, 1, 8, 8)
        np.testing.assert_allclose(run_onnx(session, images.numpy()), model(images).detach().numpy(), atol=1e-4)


def _strings(value):
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_export_json_is_portable_and_records_checks_and_precisions(teacher_export, digits_teacher):
    report = json.loads((teacher_export / "export.json").read_text())
    # The folder carries its checkpoint and names every file relative to itself: it can be copied anywhere.
    assert report["checkpoint"] == "checkpoint.pt"
    assert load_checkpoint(teacher_export / "checkpoint.pt").arch == load_checkpoint(digits_teacher).arch
    assert (teacher_export / report["exported_from"]).resolve() == digits_teacher.resolve()
    assert not [text for text in _strings(report) if os.path.isabs(text)]
    assert all(check["ok"] for check in report["artifacts"]["fp32"]["verification"].values())
    assert set(report["artifacts"]["fp32"]["verification"]) == {"1", "2", "32"}
    assert report["calibration"] == {"source": "digits", "images": 512, "method": "minmax"}
    for key in ("int8", "int8_cpu", "fp16"):
        assert report["artifacts"][key]["agreement_with_fp32"]["top1_agreement"] >= 0.9
        assert report["artifacts"][key]["bytes"] == (teacher_export / report["artifacts"][key]["path"]).stat().st_size
    int8 = report["artifacts"]["int8"]
    assert int8["tensorrt_rule_violations"] == 0 and int8["quantizer"] == "ort"
    # Which precision each kind of layer is meant to run in: INT8 convolutions (the stem kept in float), FP16 for
    # everything else, FP32 only at the boundary.
    precisions = int8["intended_precisions"]
    assert precisions["inputs_outputs"] == {"images": "fp32", "logits": "fp32"}
    assert precisions["layers"]["Conv"] == {"fp16": 1, "int8": 2} and precisions["layers"]["Gemm"] == {"fp16": 1}
    assert {p for counts in precisions["layers"].values() for p in counts} == {"int8", "fp16"}
    assert report["artifacts"]["fp32"]["intended_precisions"]["layers"]["Conv"] == {"fp32": 3}


def test_fp16_graph_is_fp16_inside_and_fp32_at_the_boundary(teacher_export):
    graph = onnx.load(str(teacher_export / "model.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = [i for i in graph.initializer if i.dims and len(i.dims) == 4]
    assert conv_weights and all(i.data_type == TensorProto.FLOAT16 for i in conv_weights)


def _exported(model: nn.Module, folder, arch: str):
    checkpoint = model_checkpoint(model.eval(), arch, {}, 10, RGB, None, "test")
    export_onnx(model, checkpoint, folder / "model.onnx", 8)
    return folder / "model.onnx"


def _add_inputs(graph: onnx.ModelProto) -> list[tuple[str, str]]:
    """For each Add: (op feeding its first input, op feeding its second), DequantizeLinear where there is one."""
    producers = {output: node for node in graph.graph.node for output in node.output}
    return [tuple(producers[name].op_type for name in node.input) for node in graph.graph.node if node.op_type == "Add"]


def _quantized_source(graph: onnx.ModelProto, add: onnx.NodeProto) -> str:
    """The op before the Q/DQ pair on this Add's quantized input."""
    producers = {output: node for node in graph.graph.node for output in node.output}
    dequantize = next(producers[name] for name in add.input if producers[name].op_type == "DequantizeLinear")
    return producers[producers[dequantize.input[0]].input[0]].op_type


def test_tensorrt_int8_graph_has_nvidias_placement_and_fp16_outside_qdq(tmp_path):
    torch.manual_seed(0)
    fp32_path = _exported(create_model("resnet20"), tmp_path, "resnet20")
    calibration = torch.randn(64, 3, 32, 32)
    graph = onnx.load(str(quantize_int8(fp32_path, tmp_path / "trt.onnx", calibration, "tensorrt")))
    assert tensorrt_qdq_violations(graph) == []
    # Every residual Add: the skip input through Q/DQ, the convolution's output straight in (Conv+Add+ReLU fuse).
    assert sorted(_add_inputs(graph)) == [("Conv", "DequantizeLinear")] * 9
    adds = [node for node in graph.graph.node if node.op_type == "Add"]
    # Option-A shortcuts (stride 2): the skip is Slice + Pad, quantized after the Pad; identities are ReLU outputs.
    assert sorted(_quantized_source(graph, add) for add in adds) == ["Pad"] * 2 + ["Relu"] * 7
    # FP16 everywhere inside, FP32 at the boundary, TensorRT's zero-points.
    floats = [i for i in graph.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(i.data_type == TensorProto.FLOAT16 for i in floats)
    assert graph.graph.input[0].type.tensor_type.elem_type == graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.graph.node[0].op_type == graph.graph.node[-1].op_type == "Cast"
    zero_points = [numpy_helper.to_array(i) for i in graph.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)
    assert read_metadata(tmp_path / "trt.onnx")["dfad_edge.precision"] == "int8"
    # ONNX Runtime's own placement, Q/DQ on both Add inputs, is what the checker rejects.
    both_inputs = ort_qdq_graph(fp32_path, calibration, "tensorrt")
    assert sum("Q/DQ on every input" in v for v in tensorrt_qdq_violations(both_inputs)) == 9
    cpu_graph = onnx.load(str(quantize_int8(fp32_path, tmp_path / "cpu.onnx", calibration, "cpu")))
    assert any("non-zero zero-point" in v for v in tensorrt_qdq_violations(cpu_graph))


def test_projection_shortcut_keeps_its_qdq_and_the_residual_branch_is_fused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), projection_block(16, 32, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    graph = onnx.load(str(quantize_int8(_exported(model, tmp_path, "custom"), tmp_path / "trt.onnx",
                                        torch.randn(32, 3, 32, 32), "tensorrt")))
    assert tensorrt_qdq_violations(graph) == []
    add = next(node for node in graph.graph.node if node.op_type == "Add")
    producers = {output: node for node in graph.graph.node for output in node.output}
    direct = next(producers[name] for name in add.input if producers[name].op_type == "Conv")
    # The fused input is the block's second 3x3 convolution; the 1x1 projection's output keeps its Q/DQ pair.
    weights = {init.name: init for init in graph.graph.initializer}
    kernel = weights[producers[direct.input[1]].input[0]].dims
    assert list(kernel[2:]) == [3, 3] and _quantized_source(graph, add) == "Conv"


def _residual_graph(quantize_conv_branch: bool, quantize_skip: bool, float_ends: bool = True,
                    zero_points: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv (Q/DQ weight) = c;  Add(c, x): each input with or without its own Q/DQ pair; between a float
    stem (1x1 convolution and ReLU) and a float classifier (1x1 convolution) unless ``float_ends`` is False."""
    initializers = [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "f"), numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
                    numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "w"),
                    numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
                    numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("Conv", ["image", "f"], ["stemmed"], name="stem"),
             helper.make_node("Relu", ["stemmed"], ["x"], name="stem_relu")] if float_ends else []
    nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"] if zero_points else ["x", "s"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv")]
    inputs = []
    for name, quantized in (("c", quantize_conv_branch), ("x", quantize_skip)):
        if quantized and name == "x":
            inputs.append("xd")
        elif quantized:
            nodes += [helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q_c"),
                      helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="dq_c")]
            inputs.append("cd")
        else:
            inputs.append(name)
    nodes.append(helper.make_node("Add", inputs, ["added" if float_ends else "y"], name="residual"))
    if float_ends:
        nodes.append(helper.make_node("Conv", ["added", "f"], ["y"], name="classifier"))
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [tensor("image" if float_ends else "x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [tensor("y", TensorProto.FLOAT, [1, 4, 2, 2])], initializers)
    return helper.make_model(graph)


def test_rule_checker_accepts_nvidias_placement_and_rejects_the_others():
    assert tensorrt_qdq_violations(_residual_graph(quantize_conv_branch=False, quantize_skip=True)) == []
    both = tensorrt_qdq_violations(_residual_graph(quantize_conv_branch=True, quantize_skip=True))
    assert len(both) == 1 and "Q/DQ on every input" in both[0] and "convolution branch must enter unquantized" in both[0]
    neither = tensorrt_qdq_violations(_residual_graph(quantize_conv_branch=False, quantize_skip=False))
    assert len(neither) == 1 and "skip input has no Q/DQ" in neither[0]
    reversed_ = tensorrt_qdq_violations(_residual_graph(quantize_conv_branch=True, quantize_skip=False))
    assert len(reversed_) == 1 and "come from no convolution" in reversed_[0]


def test_rule_checker_needs_int8_zero_points_and_float_ends_whatever_the_node_names():
    good = _residual_graph(quantize_conv_branch=False, quantize_skip=True)
    assert tensorrt_qdq_violations(good) == []
    # No zero-point on a QuantizeLinear: uint8 by the ONNX spec, which TensorRT refuses.
    missing = tensorrt_qdq_violations(_residual_graph(False, True, zero_points=False))
    assert missing == ["q_x: QuantizeLinear without a zero-point (uint8 by the ONNX spec; TensorRT needs an explicit "
                       "int8 zero-point of 0)"]
    # uint8 weights behind a DequantizeLinear without a zero-point.
    unsigned = _residual_graph(False, True)
    weights = next(init for init in unsigned.graph.initializer if init.name == "w")
    weights.CopyFrom(numpy_helper.from_array(np.ones((4, 4, 1, 1), np.uint8), "w"))
    next(node for node in unsigned.graph.node if node.name == "dq_w").input.pop()
    assert any("DequantizeLinear of uint8 weights" in v for v in tensorrt_qdq_violations(unsigned))
    # A quantized stem and classifier are found by position: renaming them does not hide them.
    ends = _residual_graph(False, True, float_ends=False)
    for node in ends.graph.node:
        node.name = f"renamed_{node.name}"
    found = tensorrt_qdq_violations(ends)
    assert [v.split(":")[0] for v in found] == ["stem Conv renamed_conv", "classifier Conv renamed_conv"]


def test_fp16_typing_keeps_the_weights_of_near_dead_channels():
    model = _residual_graph(quantize_conv_branch=False, quantize_skip=True)
    scales = np.array([1e-8, 3e-7, 2e-5, 0.02], np.float32)  # a dead channel, two FP16 subnormals, a normal one
    weights = np.array([127, -90, 101, 64], np.int8).reshape(4, 1, 1, 1) * np.ones((4, 4, 1, 1), np.int8)
    for initializer in model.graph.initializer:
        if initializer.name in ("ws", "w"):
            initializer.CopyFrom(numpy_helper.from_array(scales if initializer.name == "ws" else weights, initializer.name))
    typed = {i.name: numpy_helper.to_array(i) for i in type_fp16_outside_qdq(model).graph.initializer}
    assert typed["ws"].dtype == np.float16 and typed["s"].dtype == np.float16
    dequantized_before = weights * scales.reshape(4, 1, 1, 1)
    dequantized_after = typed["w"] * typed["ws"].astype(np.float32).reshape(4, 1, 1, 1)
    # Each channel's weights stay within half a step of the FP16 scale (FP16 alone made the first channel 0).
    step = typed["ws"].astype(np.float32).reshape(4, 1, 1, 1)
    assert np.all(np.abs(dequantized_after - dequantized_before) <= step / 2 + 1e-12)
    assert np.all(dequantized_after[0] != 0)


def test_modelopt_quantizer_is_an_optional_extra_whose_graph_is_still_checked(teacher_export, tmp_path, monkeypatch):
    fp32_path, images = teacher_export / "model.onnx", torch.randn(16, 1, 8, 8)
    if importlib.util.find_spec("modelopt") is None:
        with pytest.raises(DfadError, match=r"pip install 'dfad-edge\[modelopt\]'"):
            quantize_int8(fp32_path, tmp_path / "int8.onnx", images, "tensorrt", quantizer="modelopt")
    # A stand-in for ModelOpt's command line that records its arguments and returns the graph unquantized.
    package = tmp_path / "fake" / "modelopt" / "onnx" / "quantization"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent("""
        import json, os, shutil, sys
        arguments = sys.argv[1:]
        shutil.copy(arguments[arguments.index("--onnx_path") + 1], arguments[arguments.index("--output_path") + 1])
        json.dump(arguments, open(os.environ["MODELOPT_ARGUMENTS"], "w"))
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MODELOPT_ARGUMENTS", str(tmp_path / "arguments.json"))
    with pytest.raises(DfadError, match="from modelopt breaks TensorRT's rules.*not an explicitly quantized"):
        quantize_int8(fp32_path, tmp_path / "int8.onnx", images, "tensorrt", quantizer="modelopt")
    arguments = json.loads((tmp_path / "arguments.json").read_text())
    assert arguments[arguments.index("--high_precision_dtype") + 1] == "fp16"
    assert arguments[arguments.index("--calibration_method") + 1] == "max"
    stem = next(node.name for node in onnx.load(str(fp32_path)).graph.node if node.op_type == "Conv")
    assert f"^{stem}$" in arguments


def test_an_export_that_disagrees_with_pytorch_is_an_error(teacher_export):
    other = create_model("digits_cnn_small").eval()
    with pytest.raises(DfadError, match="disagrees with PyTorch"):
        verify_against_torch(other, teacher_export / "model.onnx", torch.randn(8, 1, 8, 8), 8)


def test_falls_back_to_the_torchscript_exporter_and_says_so(tmp_path, digits_teacher, monkeypatch):
    import dfad_edge.export.onnx_export as onnx_export

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    report = run_export(digits_teacher, tmp_path / "out", ExportOptions())
    assert report["exporter"] == "torchscript"
    assert all(check["ok"] for check in report["artifacts"]["fp32"]["verification"].values())


def test_int8_without_synthetic_images_says_how_to_calibrate(tmp_path, digits_teacher):
    result = run_cli("export", digits_teacher, "--out", tmp_path / "out", "--int8")
    assert result.exit_code == 2 and "--calib SRC" in result.output and "Traceback" not in result.output


def test_tensorrt_missing_is_one_clear_line_after_everything_else_is_written(tmp_path, digits_teacher):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = run_cli("export", digits_teacher, "--out", tmp_path / "out", "--int8", "--calib", "digits", "--tensorrt")
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output and "pip install" in result.output
    assert (tmp_path / "out" / "model.int8.onnx").exists()
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert "TensorRT is not installed" in report["engines"]["skipped"]
