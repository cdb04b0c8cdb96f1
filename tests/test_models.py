import copy
import sys

import pytest
import torch

from dfad_edge.bench.size import count_macs, count_parameters
from dfad_edge.errors import DfadError
from dfad_edge.models import create_model, default_input_size, list_models


def test_registry_lists_every_family():
    names = list_models()
    for expected in ("resnet18_8x", "resnet34_8x", "resnet20", "resnet32", "resnet44", "resnet56", "digits_cnn",
                     "generator_a"):
        assert expected in names
    assert list_models("resnet*8x") == ["resnet18_8x", "resnet34_8x"]


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(DfadError) as error:
        create_model("resnet99")
    assert "resnet56" in str(error.value) and "torchvision." in str(error.value)


def test_dfad_resnets_have_the_published_parameter_names_and_size():
    teacher = create_model("resnet34_8x", num_classes=100)
    student = create_model("resnet18_8x", num_classes=100)
    names = set(teacher.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
                "layer2.0.shortcut.1.running_var", "layer4.2.bn2.weight", "linear.weight", "linear.bias"):
        assert key in names
    # Paper figures: 21.3 M / 11.2 M parameters, ~1.16 G / ~0.56 G MACs at 32x32 and 100 classes.
    assert count_parameters(teacher) == pytest.approx(21.3e6, rel=0.01)
    assert count_parameters(student) == pytest.approx(11.2e6, rel=0.01)
    assert count_macs(teacher, (3, 32, 32)) == pytest.approx(1.16e9, rel=0.02)
    assert count_macs(student, (3, 32, 32)) == pytest.approx(0.56e9, rel=0.02)


def test_classic_cifar_resnets_have_their_known_sizes_and_no_shortcut_parameters():
    assert count_parameters(create_model("resnet20")) == pytest.approx(0.27e6, rel=0.01)
    assert count_parameters(create_model("resnet56")) == pytest.approx(0.85e6, rel=0.01)
    assert not any("shortcut" in key for key in create_model("resnet20").state_dict())


@pytest.mark.parametrize("name,size", [("resnet20", 48), ("resnet18_8x", 40), ("digits_cnn", 16)])
def test_models_accept_other_input_sizes(name, size):
    channels = 1 if name.startswith("digits") else 3
    model = create_model(name, num_classes=7, in_channels=channels).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_torchvision_teacher_of_the_prior_implementation_builds_at_224():
    model = create_model("torchvision.resnet34", num_classes=100)
    assert model.fc.out_features == 100
    assert default_input_size("torchvision.resnet34") == (224, 224)
    with pytest.raises(DfadError):
        create_model("torchvision.not_a_model")


@pytest.mark.parametrize("img_size,channels", [(8, 1), (32, 3)])
def test_generator_makes_standardised_images_of_the_asked_shape(img_size, channels):
    generator = create_model("generator_a", nz=16, ngf=8, img_size=img_size, channels=channels).train()
    images = generator(torch.randn(64, 16))
    assert images.shape == (64, channels, img_size, img_size)
    # The final affine-free BatchNorm puts images in the teacher's normalised space: zero mean, unit variance.
    per_channel = images.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(channels), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(channels), atol=1e-2)
    with pytest.raises(DfadError):
        create_model("generator_a", img_size=3)


@pytest.mark.parametrize("arch", ["generator_a", "generator_pixels"])
def test_generators_for_large_images_start_small_and_stay_a_few_million_parameters(arch):
    # Scaling the 32-px design (Linear to a quarter-size map) gave 103 M parameters at 224 px.
    for img_size, first_map in ((224, 7), (96, 6), (100, 7)):
        generator = create_model(arch, nz=256, ngf=64, img_size=img_size, channels=3).train()
        assert generator.init_size == first_map
        assert sum(p.numel() for p in generator.parameters()) < 3_000_000
        assert generator(torch.randn(2, 256)).shape == (2, 3, img_size, img_size)
    # Up to 64 px the design is DFAD's: 8x8 at 32 px, two stages, 2ngf -> 2ngf -> ngf channels.
    small = create_model(arch, nz=256, ngf=64, img_size=32, channels=3)
    assert (small.init_size, small.stages, small.to_image.in_channels) == (8, 2, 64)


@pytest.mark.parametrize("arch,img_size", [("generator_a", 32), ("generator_a", 8), ("generator_pixels", 30),
                                          ("generator_a", 100)])
def test_generators_upsample_as_one_transposed_convolution_with_the_values_and_gradients_as_written(arch, img_size):
    from dfad_edge.models.generator import UpsampleConv2d

    generator = create_model(arch, nz=16, ngf=8, img_size=img_size, channels=3).double().train()
    as_written = copy.deepcopy(generator)
    layers = [m for m in as_written.modules() if isinstance(m, UpsampleConv2d)]
    assert len(layers) == generator.stages
    for layer in layers:
        layer.subpixel = False  # nearest x2 upsampling, then the 3x3 convolution
    z = torch.randn(6, 16, dtype=torch.double)
    fast, reference = generator(z), as_written(z)
    assert torch.allclose(fast, reference, rtol=0, atol=1e-10)
    (fast * reference.detach()).sum().backward()
    (reference * reference.detach()).sum().backward()
    for (name, parameter), twin in zip(generator.named_parameters(), as_written.parameters()):
        assert torch.allclose(parameter.grad, twin.grad, rtol=0, atol=1e-9), name
    # Checkpoints keep their keys: the layer is a Conv2d with a Conv2d's parameters.
    assert "block1.0.weight" in generator.state_dict()


def test_cifar_mobilenetv2_keeps_a_4x4_map_at_32x32_and_has_its_known_size():
    from dfad_edge.models.mobilenetv2_cifar import InvertedResidual

    model = create_model("mobilenetv2_cifar", num_classes=10).eval()
    # Stride-1 stem and second stage: 32x32 ends as 4x4 (the ImageNet form would leave 1x1).
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, 4, 4)
    # The CIFAR MobileNetV2 of the DFKD literature: ~2.2 M parameters, ~88 M MACs at 32x32.
    assert count_parameters(model) == pytest.approx(2.24e6, rel=0.01)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(88e6, rel=0.02)
    assert sum(block.residual for block in model.modules() if isinstance(block, InvertedResidual)) == 10
    assert count_parameters(create_model("mobilenetv2_cifar_050")) < count_parameters(model) / 3


def test_library_models_carry_their_pretrained_input_config():
    from dfad_edge.models import get_entry

    timm_resnet = get_entry("timm.resnet18")
    assert timm_resnet.input_size == (224, 224) and timm_resnet.pretrained.mean == (0.485, 0.456, 0.406)
    # A weight tag selects that weight's own evaluation crop.
    assert get_entry("timm.resnet18.a1_in1k").pretrained.crop_pct == 0.95
    assert get_entry("timm.resnet18.tv_in1k").pretrained.crop_pct == 0.875
    efficientnet = get_entry("torchvision.efficientnet_b3")
    assert efficientnet.input_size == (300, 300) and efficientnet.pretrained.crop_pct == pytest.approx(300 / 320)
    assert get_entry("timm.test_vit").fixed_input_size and not timm_resnet.fixed_input_size
    with pytest.raises(DfadError, match="unknown timm architecture 'resnet9000'"):
        create_model("timm.resnet9000")


def test_without_timm_a_timm_architecture_is_one_line_naming_the_extra(monkeypatch):
    from conftest import run_cli

    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without the extra sees
    with pytest.raises(DfadError, match=r"pip install 'dfad-edge\[timm\]'"):
        create_model("timm.resnet18")
    result = run_cli("models", "--timm")
    assert result.exit_code == 2 and "dfad-edge[timm]" in result.output and "Traceback" not in result.output


def test_models_lists_parameters_and_macs_to_pick_a_student_by_budget(monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv("COLUMNS", "200")
    listed = run_cli("models", "mobilenetv2*").output + run_cli("models", "*mobilenet*v3_small*", "--torchvision",
                                                                "--timm").output
    for name, params, macs in (("mobilenetv2_cifar ", "2.24 M", "88.0 M"), ("mobilenetv2_cifar_050", "0.70 M", "28.0 M"),
                               ("torchvision.mobilenet_v3_small", "2.54 M", "56.5 M"),
                               ("timm.mobilenetv3_small_100", "2.54 M", "56.5 M")):
        line = next(line for line in listed.splitlines() if name in line)
        assert params in line and macs in line, line
    everything = run_cli("models", "--timm").output
    assert "narrow the list with a pattern" in everything and "timm.resnet18 " in everything


def _with_trained_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorm layers are the identity map (mean 0, var 1); folding must also be right for trained ones."""
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            for buffer, low, high in ((layer.running_mean, -0.5, 0.5), (layer.running_var, 0.3, 3.0),
                                      (layer.weight.data, 0.5, 1.5), (layer.bias.data, -0.3, 0.3)):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * (high - low) + low)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("arch", ["resnet20", "resnet18_8x", "mobilenetv2_cifar"])
def test_folded_teacher_computes_what_the_teacher_computes_and_leaves_it_untouched(arch):
    from dfad_edge.models.frozen import fold_batchnorm

    def count_batchnorm(model):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    teacher = _with_trained_batchnorm_statistics(create_model(arch, num_classes=10))
    images = torch.randn(4, 3, *default_input_size(arch))
    state = {key: value.clone() for key, value in teacher.state_dict().items()}
    with torch.no_grad():
        expected = teacher(images)
    folded = fold_batchnorm(teacher, images)
    assert folded.reason == "" and folded.layers == count_batchnorm(teacher) and count_batchnorm(folded.module) == 0
    with torch.no_grad():
        assert torch.allclose(folded.module(images), expected, rtol=1e-4, atol=1e-4)
        # The original is untouched (BN-statistics matching hooks its BatchNorm layers) and computes as before.
        assert torch.equal(teacher(images), expected)
    assert all(torch.equal(state[key], value) for key, value in teacher.state_dict().items())


def test_a_model_that_cannot_be_folded_is_used_as_it_is():
    from dfad_edge.models.frozen import fold_batchnorm

    class DataDependent(torch.nn.Module):  # control flow on values: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = DataDependent().eval()
    folded = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert folded.module is model and folded.layers == 0 and "not traceable" in folded.reason
    no_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    assert fold_batchnorm(no_batchnorm, torch.randn(2, 3, 8, 8)).reason == "no BatchNorm layers"


def test_weights_cast_once_give_exactly_what_autocast_gives():
    from dfad_edge.models.frozen import cast_for_autocast

    teacher = _with_trained_batchnorm_statistics(create_model("resnet20", num_classes=10))
    cast = copy.deepcopy(teacher)
    cast_for_autocast(cast, torch.bfloat16)
    assert cast.conv1.weight.dtype == torch.bfloat16 and cast.linear.weight.dtype == torch.bfloat16
    assert cast.bn1.weight.dtype == torch.float32 and cast.bn1.running_var.dtype == torch.float32
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(cast(images), teacher(images))
