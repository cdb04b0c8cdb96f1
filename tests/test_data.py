from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfad_edge.checkpoint import InputSpec
from dfad_edge.data import check_compatible, make_loader, resolve_source, split_sizes
from dfad_edge.errors import DfadError


def test_digits_is_a_fixed_stratified_split():
    source = resolve_source("digits")
    test = source.dataset("test")
    labels = torch.stack([test[i][1] for i in range(len(test))])
    assert source.num_classes == 10 and len(test) == 450 and len(source.dataset("train")) == 1347
    from sklearn.datasets import load_digits

    expected = torch.bincount(torch.from_numpy(load_digits().target)) * 0.25
    assert torch.all((torch.bincount(labels) - expected).abs() <= 1)  # stratified: each class in proportion
    again = resolve_source("digits").dataset("test")
    assert torch.equal(again[0][0], test[0][0]) and torch.equal(again[449][0], test[449][0])


def test_splits_are_the_first_10_20_and_100_percent():
    assert split_sizes(10000) == {"10%": 1000, "20%": 2000, "100%": 10000}
    assert split_sizes(450) == {"10%": 45, "20%": 90, "100%": 450}


def _image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=3, mode="RGB", size=12) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{index:03d}.png")
    return root


def test_image_folder_interleaves_the_classes_and_resizes_to_the_model(tmp_path):
    root = _image_folder(tmp_path / "data")
    source = resolve_source(str(root))
    assert source.class_names == ["cat", "dog", "emu"] and source.channels == 3
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
    loader = make_loader(source, "test", spec, batch_size=16)
    images, labels = next(iter(loader))
    assert images.shape == (9, 3, 32, 32)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    files = [path.name for path, _label in source.dataset("test").samples]
    assert files == ["000.png"] * 3 + ["001.png"] * 3 + ["002.png"] * 3  # each class's files in name order


def test_every_prefix_of_an_uneven_image_folder_holds_each_class_in_proportion():
    from dfad_edge.data.sources import interleave_by_class

    sizes = [100, 50, 10, 240]
    order = interleave_by_class([[Path(f"c{c}/{i:04d}.png") for i in range(n)] for c, n in enumerate(sizes)])
    labels = torch.tensor([label for _path, label in order])
    assert len(labels) == sum(sizes)
    for prefix in (40, 80, 400):
        counts = torch.bincount(labels[:prefix], minlength=4).float()
        expected = torch.tensor(sizes, dtype=torch.float) * prefix / sum(sizes)
        assert torch.all((counts - expected).abs() <= 1), (prefix, counts, expected)


def test_a_mislabelled_first_class_folder_moves_the_10_percent_split_no_more_than_the_full_set(tmp_path, digits_teacher):
    """A quick 10% estimate must be representative: when the folder that sorts first holds the wrong images,
    the 10% split loses about as much as the full set (a class-sorted order would show ~0% on the 10% split)."""
    from dfad_edge.data.sources import _digits_arrays
    from dfad_edge.evaluate import evaluate_checkpoint

    _train_x, test_x, _train_y, test_y = _digits_arrays()
    for label in range(10):
        # Folder "0" gets the images of digit 1: every image in it is mislabelled.
        source_label = 1 if label == 0 else label
        folder = tmp_path / "digits" / str(label)
        folder.mkdir(parents=True)
        for index, image in enumerate(test_x[test_y == source_label]):
            Image.fromarray((image[0] * 255).round().astype(np.uint8), "L").save(folder / f"{index:03d}.png")
    result = evaluate_checkpoint(digits_teacher, str(tmp_path / "digits"), torch.device("cpu"))
    accuracy = result["accuracy"]
    assert 0.8 <= accuracy["100%"] <= 0.92  # about one class in ten is wrong
    assert abs(accuracy["10%"] - accuracy["100%"]) <= 0.05, accuracy


def test_a_folder_of_class_folders_is_a_test_set(tmp_path):
    root = _image_folder(tmp_path / "data")
    source = resolve_source(str(root / "test"))
    assert not source.has_split("train") and len(source.dataset("test")) == 9
    with pytest.raises(DfadError, match="no 'train' split"):
        source.dataset("train")


def test_mismatches_between_data_and_model_are_clear_errors(tmp_path):
    source = resolve_source(str(_image_folder(tmp_path / "data")))
    with pytest.raises(DfadError, match="class-count mismatch"):
        check_compatible(source, InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3), 10, None)
    with pytest.raises(DfadError, match="image-shape mismatch"):
        check_compatible(source, InputSpec(1, 32, 32, [0.5], [0.5]), 3, None)
    with pytest.raises(DfadError, match="class order"):
        check_compatible(source, InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3), 3, ["dog", "cat", "emu"])


def test_unknown_or_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(DfadError, match="unknown data source"):
        resolve_source("imagenet-21k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfadError, match="no class folders"):
        resolve_source(str(tmp_path / "empty"))


def test_missing_cifar_without_download_says_what_to_do(tmp_path):
    source = resolve_source("cifar10", tmp_path)
    with pytest.raises(DfadError, match="--download"):
        source.dataset("test")


def test_an_unreadable_image_is_one_line_even_from_a_loader_worker(tmp_path, digits_teacher):
    from conftest import run_cli

    root = _image_folder(tmp_path / "folder", classes=tuple(str(d) for d in range(10)), per_class=2, mode="L", size=8)
    (root / "test" / "3" / "broken.png").write_bytes(b"not an image at all")
    # Image files are decoded in worker processes: the error crosses a process boundary with a traceback attached.
    result = run_cli("eval", digits_teacher, "--data", root)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot read image" in result.output and "broken.png" in result.output
    worker_text = "Caught DfadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n" \
                  '  File "x.py", line 1\ndfad_edge.errors.DfadError: cannot read image a.png: truncated'
    assert DfadError(worker_text).user_message() == "cannot read image a.png: truncated"


@pytest.mark.parametrize("height,width", [(300, 400), (400, 300), (224, 224)])
def test_center_crop_is_torchvision_resize_then_center_crop(height, width):
    from torchvision.transforms import functional

    from dfad_edge.data.loaders import center_crop

    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    # torchvision's ImageNet evaluation transform: Resize(256), CenterCrop(224).
    reference = functional.center_crop(functional.resize(image, 256, antialias=True), 224)
    assert torch.allclose(center_crop(image, 224, 224, 0.875), reference, atol=1e-6)
    # Weights evaluated with a bicubic resize (many of timm's) get it, kept in [0, 1] as PIL's 8-bit output is.
    bicubic = functional.resize(image, 256, interpolation=functional.InterpolationMode.BICUBIC, antialias=True)
    reference = functional.center_crop(bicubic.clamp(0, 1), 224)
    assert torch.allclose(center_crop(image, 224, 224, 0.875, "bicubic"), reference, atol=1e-6)
    assert not torch.allclose(center_crop(image, 224, 224, 0.875), reference, atol=1e-3)


def test_an_imagenet_style_torchvision_teacher_is_evaluated_on_the_centre_crop(tmp_path):
    """Images with a red frame around a blue centre: the teacher sees only blue (the crop cuts the frame away), a
    CIFAR-size model the whole stretched image, frame included."""
    from dfad_edge.checkpoint import import_checkpoint
    from dfad_edge.models import create_model

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        pixels = np.zeros((64, 80, 3), dtype=np.uint8)
        pixels[..., 0] = 255  # red frame, 2 pixels wide: within the 1/16 a 0.875 crop cuts off each side
        pixels[2:-2, 2:-2] = (0, 0, 255)
        Image.fromarray(pixels).save(tmp_path / "data" / name / "0.png")
    torch.save(create_model("torchvision.mobilenet_v3_small", num_classes=2).state_dict(), tmp_path / "user.pth")
    teacher = import_checkpoint(tmp_path / "user.pth", "torchvision.mobilenet_v3_small")
    spec = teacher.input_spec
    assert (spec.height, spec.width, spec.transform, spec.crop_pct) == (224, 224, "center_crop", 0.875)

    def red_share(spec: InputSpec) -> float:
        images, _labels = next(iter(make_loader(resolve_source(str(tmp_path / "data")), "test", spec, workers=0)))
        pixels = images * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
        return float((pixels[:, 0] > 0.5).float().mean())

    assert red_share(spec) == 0.0
    assert red_share(InputSpec(3, 32, 32, spec.mean, spec.std)) > 0.05
