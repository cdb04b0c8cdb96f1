import json
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from dfad_edge.checkpoint import InputSpec, load_checkpoint, model_checkpoint
from dfad_edge.errors import DfadError
from dfad_edge.export import ExportOptions, run_export
from dfad_edge.export.onnx_export import ort_session, read_metadata, run_onnx, verify_against_torch
from dfad_edge.export.qdq_rules import tensorrt_qdq_violations
from dfad_edge.export.quantize import quantize_int8
from dfad_edge.export.tensorrt_build import build_engine, check_engine_compatible
from dfad_edge.models import create_model


@pytest.fixture(scope="module")
def student_export(distilled_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-student")
    result = run_cli("export", distilled_digits / "student.pt", "--out", out, "--int8", "--fp16", "--max-batch", "32")
    assert result.exit_code == 0, result.output
    return out


def test_onnx_carries_the_input_spec_and_runs_any_batch(student_export, distilled_digits):
    metadata = read_metadata(student_export / "model.onnx")
    spec = json.loads(metadata["dfad_edge.input_spec"])
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 8, 8)
    assert json.loads(metadata["dfad_edge.class_names"])[7] == "7"
    model = load_checkpoint(distilled_digits / "student.pt").build_model()
    session = ort_session(student_export / "model.onnx")
    for batch in (1, 3, 32):
        images = torch.randn(batch, 1, 8, 8)
        np.testing.assert_allclose(run_onnx(session, images.numpy()), model(images).detach().numpy(), atol=1e-4)


def test_export_json_records_verification_and_generator_calibration(student_export, distilled_digits):
    report = json.loads((student_export / "export.json").read_text())
    assert all(check["ok"] for check in report["artifacts"]["fp32"]["verification"].values())
    assert set(report["artifacts"]["fp32"]["verification"]) == {"1", "2", "32"}
    assert report["calibration"]["source"] == f"generator:{distilled_digits / 'generator.pt'}"
    assert report["calibration"]["images"] == 512
    for key in ("int8", "int8_cpu", "fp16"):
        assert report["artifacts"][key]["agreement_with_fp32"]["top1_agreement"] >= 0.9
        assert report["artifacts"][key]["bytes"] == (student_export / report["artifacts"][key]["path"]).stat().st_size
    assert report["artifacts"]["int8"]["tensorrt_rule_violations"] == 0


def test_fp16_graph_is_fp16_inside_and_fp32_at_the_boundary(student_export):
    graph = onnx.load(str(student_export / "model.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = [i for i in graph.initializer if i.dims and len(i.dims) == 4]
    assert conv_weights and all(i.data_type == TensorProto.FLOAT16 for i in conv_weights)


def test_tensorrt_flavour_meets_tensorrt_rules_on_a_residual_network(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.25] * 3)
    checkpoint = model_checkpoint(model, "resnet20", {}, 10, spec, None, "test")
    checkpoint.save(tmp_path / "r20.pt")
    from dfad_edge.export.onnx_export import export_onnx

    export_onnx(model, checkpoint, tmp_path / "model.onnx", 8)
    calibration = torch.randn(64, 3, 32, 32)
    trt_graph = onnx.load(str(quantize_int8(tmp_path / "model.onnx", tmp_path / "trt.onnx", calibration, "tensorrt")))
    assert tensorrt_qdq_violations(trt_graph) == []
    # Every residual Add gets Q/DQ on both inputs, every zero-point is 0, weights are per-channel.
    producers = {o: n for n in trt_graph.graph.node for o in n.output}
    adds = [n for n in trt_graph.graph.node if n.op_type == "Add"]
    assert len(adds) == 9 and all(producers[i].op_type == "DequantizeLinear" for n in adds for i in n.input)
    zero_points = [numpy_helper.to_array(i) for i in trt_graph.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(np.all(z == 0) and z.dtype == np.int8 for z in zero_points)
    cpu_graph = onnx.load(str(quantize_int8(tmp_path / "model.onnx", tmp_path / "cpu.onnx", calibration, "cpu")))
    assert any("non-zero zero-point" in v for v in tensorrt_qdq_violations(cpu_graph))


def _tiny_graph(add_inputs_quantized: bool) -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"], name="dq"),
             helper.make_node("Relu", ["x"], ["r"], name="relu")]
    second = "xd" if add_inputs_quantized else "r"
    nodes.append(helper.make_node("Add", ["xd", second], ["y"], name="residual"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero])
    return helper.make_model(graph)


def test_rule_checker_flags_a_residual_add_without_qdq():
    assert tensorrt_qdq_violations(_tiny_graph(True)) == []
    violations = tensorrt_qdq_violations(_tiny_graph(False))
    assert len(violations) == 1 and "residual Add" in violations[0]


def test_an_export_that_disagrees_with_pytorch_is_an_error(student_export, distilled_digits):
    other = create_model("digits_cnn_small").eval()
    with pytest.raises(DfadError, match="disagrees with PyTorch"):
        verify_against_torch(other, student_export / "model.onnx", torch.randn(8, 1, 8, 8), 8)


def test_falls_back_to_the_torchscript_exporter_and_says_so(tmp_path, digits_teacher, monkeypatch):
    import dfad_edge.export.onnx_export as onnx_export

    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    report = run_export(digits_teacher, tmp_path / "out", ExportOptions())
    assert report["exporter"] == "torchscript"
    assert all(check["ok"] for check in report["artifacts"]["fp32"]["verification"].values())


def test_int8_without_a_generator_says_how_to_calibrate(tmp_path, digits_teacher):
    result = run_cli("export", digits_teacher, "--out", tmp_path / "out", "--int8")
    assert result.exit_code == 2 and "--calib SRC" in result.output and "Traceback" not in result.output


def test_tensorrt_missing_is_one_clear_line_after_everything_else_is_written(tmp_path, digits_teacher):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    result = run_cli("export", digits_teacher, "--out", tmp_path / "out", "--int8", "--calib", "digits", "--tensorrt")
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output and "pip install" in result.output
    assert (tmp_path / "out" / "model.int8.onnx").exists()
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert "TensorRT is not installed" in report["engines"]["skipped"]


class _FakeTensorRT:
    """Only the documented TensorRT 10/11 Python API that build_engine uses, recording every call."""

    def __init__(self, version="10.3.0", strongly_typed=True, parse_ok=True):
        self.__version__, self.calls = version, []
        fake = self
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        members = {"EXPLICIT_BATCH": 0, **({"STRONGLY_TYPED": 1} if strongly_typed else {})}
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**members)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("memory_pool", pool, size))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", data))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile", profile.shapes))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

        class Profile:
            def set_shape(self, name, smallest, optimal, largest):
                self.shapes = (name, smallest, optimal, largest)

        class Network:
            def get_input(self, index):
                return types.SimpleNamespace(name="images", shape=(-1, 1, 8, 8))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized-engine"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return parse_ok

            def get_error(self, index):
                return "Unsupported operator FooBar"

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_tensorrt_builder_follows_the_documented_api(tmp_path, student_export):
    fake = _FakeTensorRT()
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    sidecar = build_engine(student_export / "model.int8.onnx", tmp_path / "model.int8.engine", "int8", (1, 16, 32),
                           trt=fake, gpu=gpu)
    assert ("create_network", 1 << 1) in fake.calls  # strongly typed: precision follows the graph
    assert not [c for c in fake.calls if c[0] == "set_flag"]  # never a precision flag
    assert ("add_profile", ("images", (1, 1, 8, 8), (16, 1, 8, 8), (32, 1, 8, 8))) in fake.calls
    assert (tmp_path / "model.int8.engine").read_bytes() == b"serialized-engine"
    assert (tmp_path / "timing.cache").read_bytes() == b"timing-cache"
    assert sidecar["tensorrt_version"] == "10.3.0" and sidecar["batch_range"] == [1, 16, 32]
    # The timing cache is reused on the next build.
    build_engine(student_export / "model.onnx", tmp_path / "model.fp32.engine", "fp32", (1, 16, 32), trt=fake, gpu=gpu)
    assert ("create_timing_cache", b"timing-cache") in fake.calls
    # TensorRT 11 has no STRONGLY_TYPED flag to set: the network is created without flags.
    trt11 = _FakeTensorRT(version="11.4.1", strongly_typed=False)
    build_engine(student_export / "model.onnx", tmp_path / "e11.engine", "fp32", (1, 16, 32), trt=trt11, gpu=gpu)
    assert ("create_network", 0) in trt11.calls


def test_engine_built_elsewhere_is_refused_and_parse_errors_are_clear(tmp_path, student_export):
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    build_engine(student_export / "model.onnx", tmp_path / "model.fp32.engine", "fp32", (1, 1, 1), trt=_FakeTensorRT(), gpu=gpu)
    assert check_engine_compatible(tmp_path / "model.fp32.engine", "10.3.0", gpu)["precision"] == "fp32"
    with pytest.raises(DfadError, match="rebuild it here"):
        check_engine_compatible(tmp_path / "model.fp32.engine", "10.3.0", {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(DfadError, match="TensorRT 10.3.0"):
        check_engine_compatible(tmp_path / "model.fp32.engine", "11.4.1", gpu)
    with pytest.raises(DfadError, match="Unsupported operator"):
        build_engine(student_export / "model.onnx", tmp_path / "bad.engine", "fp32", (1, 1, 1),
                     trt=_FakeTensorRT(parse_ok=False), gpu=gpu)
