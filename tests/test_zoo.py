"""Teachers from the model libraries people keep them in (timm, torchvision), distilled into the edge students, exported
and benched on a CPU with tiny budgets. Random-weight teachers: these tests check the plumbing (shapes, files, ONNX
against PyTorch, class counts), not accuracy."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from dfad_edge.checkpoint import load_checkpoint

CLASSES = 12  # more than 10, so bench reports top-5 too
# Enough synthetic images (2 x 32 synthesised + 2 x 3 x 32 sampled) for INT8 calibration and export's verification.
TINY_DISTILL = ["--set", "epochs=1", "--set", "iters_per_epoch=2", "--set", "batch_size=32", "--set", "student_steps=2",
                "--set", "diagnostic_images=32", "--set", "sample_images=8", "--device", "cpu"]  # the default method


def _timm_resnet() -> torch.nn.Module:
    import timm

    return timm.create_model("test_resnet", num_classes=CLASSES)  # timm's own tiny ResNet


def _torchvision_mobilenet() -> torch.nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=CLASSES)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A test set of CLASSES class folders, two 40x48 RGB images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        folder = root / f"class{label:02d}"
        folder.mkdir()
        for index in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def _user_checkpoint(model: torch.nn.Module, path):
    """A user's checkpoint of a random-weight model whose BatchNorm statistics were measured on images, as a trained
    model's are: with the initial ones (mean 0, variance 1) activations vanish through a deep net (MobileNetV3's logits
    are ~1e-10), and INT8 calibration would meet all-zero tensors no trained model has."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    torch.save({"model": model.state_dict()}, path)
    return path


def _ok(*args):
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("arch,build", [("timm.test_resnet", _timm_resnet),
                                        ("torchvision.mobilenet_v3_small", _torchvision_mobilenet)])
def test_a_library_teacher_distils_into_the_cifar_mobilenetv2_exports_and_benches(arch, build, image_folder, tmp_path):
    torch.manual_seed(0)
    imported = _ok("import", _user_checkpoint(build(), tmp_path / "user.pth"), "--arch", arch, "--input-size", "32",
                   "--out", tmp_path / "teacher.pt")
    assert "pretrained config" in imported.output  # mean and std came from the library, and it says so
    teacher = load_checkpoint(tmp_path / "teacher.pt")
    assert teacher.input_spec.transform == "stretch"  # a 32x32 model is evaluated CIFAR-style

    _ok("distill", "--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "run", "--student", "mobilenetv2_cifar",
        *TINY_DISTILL)
    student = load_checkpoint(tmp_path / "run" / "student.pt")
    assert (student.arch, student.num_classes, student.input_spec.shape) == ("mobilenetv2_cifar", CLASSES, (3, 32, 32))
    assert student.input_spec.mean == teacher.input_spec.mean

    for role, checkpoint in (("student", tmp_path / "run" / "student.pt"), ("teacher", tmp_path / "teacher.pt")):
        _ok("export", checkpoint, "--out", tmp_path / role, "--int8", "--calib-images", "32", "--max-batch", "8",
            "--synthetic", tmp_path / "run" / "synthetic.pt")
        export = json.loads((tmp_path / role / "export.json").read_text())
        worst = max(v["max_abs_diff"] for v in export["artifacts"]["fp32"]["verification"].values())
        assert worst < 1e-3, f"{role}: ONNX disagrees with PyTorch by {worst}"
        assert (tmp_path / role / "model.int8.onnx").is_file() and (tmp_path / role / "model.int8.cpu.onnx").is_file()

    _ok("bench", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student", "--data", image_folder,
        "--out", tmp_path / "bench", "--backends", "torch,onnxruntime", "--precisions", "fp32,int8", "--batch-sizes", "1",
        "--iterations", "2", "--warmup", "0", "--rounds", "1", "--device", "cpu")
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    ran = {(r["model"], r["backend"], r["precision"]): r for r in report["results"] if "skipped" not in r}
    for model in ("teacher", "student"):
        assert {(model, "torch", "fp32"), (model, "onnxruntime", "fp32"), (model, "onnxruntime", "int8")} <= set(ran)
        # ONNX Runtime FP32 predicts what PyTorch predicts on every real test image.
        assert ran[(model, "onnxruntime", "fp32")]["agreement"]["fp32"]["100%"] == 1.0
        assert ran[(model, "onnxruntime", "int8")]["images"]["100%"] == 2 * CLASSES
        top1, top5 = ran[(model, "torch", "fp32")]["accuracy"]["100%"], ran[(model, "torch", "fp32")]["accuracy_top5"]["100%"]
        assert top1 <= top5
        assert np.asarray(report["per_class"][model]["confusion"]).shape == (CLASSES, CLASSES)
    assert report["per_class"]["images"] == [2] * CLASSES
    for figure in ("tradeoff.png", "confusion.png"):
        assert (tmp_path / "bench" / figure).read_bytes()[:4] == b"\x89PNG"


def test_a_teacher_without_batchnorm_distils_without_the_batchnorm_term_and_is_refused_with_it(tmp_path):
    import timm

    # timm's tiny ViT (LayerNorm only), built for 32x32 images: its position embeddings fix the input size.
    vit = timm.create_model("test_vit", num_classes=10, img_size=32)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in vit.modules())
    _ok("import", _user_checkpoint(vit, tmp_path / "vit.pth"), "--arch", "timm.test_vit", "--input-size", "32",
        "--out", tmp_path / "teacher.pt")
    teacher = load_checkpoint(tmp_path / "teacher.pt")
    assert teacher.arch_kwargs["img_size"] == [32, 32]
    assert teacher.build_model()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    args = ["distill", "--teacher", tmp_path / "teacher.pt", "--student", "mobilenetv2_cifar_050", *TINY_DISTILL]
    refused = run_cli(*args, "--out", tmp_path / "with-bn")
    assert refused.exit_code == 2 and "no BatchNorm" in refused.output and "bn_stats" in refused.output
    _ok(*args, "--out", tmp_path / "without-bn", "--set", "bn_stats=0")
    student = load_checkpoint(tmp_path / "without-bn" / "student.pt")
    assert student.num_classes == 10 and student.build_model()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
