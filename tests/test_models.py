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
        create_model("generator_a", img_size=30)
