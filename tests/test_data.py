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


def test_image_folder_orders_by_class_then_file_and_resizes_to_the_model(tmp_path):
    root = _image_folder(tmp_path / "data")
    source = resolve_source(str(root))
    assert source.class_names == ["cat", "dog", "emu"] and source.channels == 3
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
    loader = make_loader(source, "test", spec, batch_size=16)
    images, labels = next(iter(loader))
    assert images.shape == (9, 3, 32, 32)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


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
