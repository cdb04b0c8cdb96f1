"""The image-prior method: augmented crops of source images a user can have (built-in photographs, --images)."""

from __future__ import annotations

import hashlib
import json
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import distill_config, run_cli
from dfad_edge.data.unlabeled import image_files, load_source_images
from dfad_edge.distill import DistillRun
from dfad_edge.distill.augment import colour_jitter, cutmix, mixup, resized_crop_boxes
from dfad_edge.errors import DfadError


def _prior(**changes):
    """The tiny preset cut to seconds, without the generator unless a test asks for one."""
    options = {"batch_size": 32, "generator_fraction": 0.0, **changes.pop("options", {})}
    settings = dict(epochs=2, iters_per_epoch=2, diagnostic_images=64, sample_images=16, options=options)
    settings.update(changes)
    return distill_config("prior", "tiny", **settings)


def _write_images(folder, count: int, size=(40, 60), seed: int = 0, channels: int = 3) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"frame_{index}.png"
        pixels = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
        paths.append(path)
    return paths


def test_crop_boxes_span_the_scale_and_ratio_ranges_and_stay_inside_the_source():
    sizes = torch.tensor([[300, 400], [512, 512]])
    picks = torch.randint(0, 2, (20000,), generator=torch.Generator().manual_seed(0))
    scale, ratio = (0.001, 0.25), (0.75, 4 / 3)
    boxes = resized_crop_boxes(sizes, picks, scale, ratio, torch.Generator().manual_seed(1))
    heights, widths = sizes[picks, 0].float(), sizes[picks, 1].float()
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    share = box_w * box_h / (heights * widths)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= widths + 1e-3).all() and (boxes[:, 3] <= heights + 1e-3).all()
    assert share.min() >= scale[0] * 0.99 and share.max() <= scale[1] * 1.01
    # Uniform in area: every tenth of the range is used about equally often.
    counts = torch.histc(share, bins=10, min=scale[0], max=scale[1])
    assert counts.min() > 0.7 * counts.mean()
    aspect = box_w / box_h
    assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
    assert aspect.quantile(0.1) < 0.85 and aspect.quantile(0.9) > 1.15


def test_colour_jitter_stays_in_range_and_leaves_unselected_images_alone():
    images = torch.rand(256, 3, 8, 8)
    jittered = colour_jitter(images, 0.4, 0.5, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 1
    unchanged = (jittered - images).abs().flatten(1).amax(1) < 1e-6
    assert 0.35 < unchanged.float().mean() < 0.65


def test_cutmix_pastes_one_box_of_another_image_into_the_chosen_share():
    torch.manual_seed(0)
    images = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1).expand(64, 1, 16, 16).contiguous()
    mixed = cutmix(images, probability=0.5, alpha=1.0)
    changed = (mixed != images).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.7
    for index in torch.nonzero(changed).flatten().tolist():
        foreign = mixed[index, 0] != images[index, 0, 0, 0]
        rows, cols = torch.nonzero(foreign, as_tuple=True)
        # One rectangle, filled with a single other image's value.
        assert foreign.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mixed[index, 0][foreign].unique().numel() == 1


def test_mixup_blends_the_chosen_share_each_with_one_other_image():
    torch.manual_seed(0)
    # Image i is the one-hot vector e_i: a blend shows its partner and both weights.
    images = torch.eye(64).view(64, 64, 1, 1).expand(64, 64, 2, 2).contiguous()
    mixed = mixup(images, probability=0.5, alpha=1.0)
    changed = (mixed != images).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.7
    weights = mixed[:, :, 0, 0]
    assert torch.equal(mixed, weights.view(64, 64, 1, 1).expand_as(mixed))  # the whole image blended, no box
    assert torch.allclose(weights.sum(1), torch.ones(64)) and (weights >= 0).all()
    for index in torch.nonzero(changed).flatten().tolist():
        others = torch.nonzero(weights[index]).flatten().tolist()
        assert len(others) == 2 and index in others  # itself and exactly one partner
    # alpha shapes lambda: small alpha blends little (lambda near 0 or 1), alpha 1 anywhere in between.
    lam = mixup(images, probability=1.0, alpha=0.05)[:, :, 0, 0].diagonal()
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.8
    assert torch.equal(mixup(images, probability=0.0, alpha=1.0), images)


def test_mixup_reaches_the_student_batch(tmp_path, digits_teacher):
    plain = DistillRun(_prior(options={"cutmix": 0.0, "jitter": 0.0}), digits_teacher, tmp_path / "plain")
    mixed = DistillRun(_prior(options={"cutmix": 0.0, "jitter": 0.0, "mixup": 1.0, "mixup_alpha": 0.5}),
                       digits_teacher, tmp_path / "mixed")
    for run in (plain, mixed):
        torch.manual_seed(5)
        run.batch = run.method.student_batch()
    # The same crops (same seed), then blended: blending pulls the images towards each other.
    assert not torch.equal(plain.batch, mixed.batch)
    assert mixed.batch.std(0).mean() < plain.batch.std(0).mean()


def test_crops_are_mirrored_only_where_flips_are_allowed(tmp_path, digits_teacher):
    run = DistillRun(_prior(options={"jitter": 0.0}), digits_teacher, tmp_path / "run")
    method = run.method
    # Decided by the teacher itself, once, and recorded.
    assert method.flip_allowed == (method.flip_agreement >= 0.8)
    straight = method.crops(512, torch.Generator().manual_seed(3), flip=False)
    maybe_mirrored = method.crops(512, torch.Generator().manual_seed(3), flip=True)
    same = (maybe_mirrored == straight).flatten(1).all(1)
    mirrored = (maybe_mirrored == straight.flip(-1)).flatten(1).all(1) & ~same
    assert (same | mirrored).all() and 0.4 < mirrored.float().mean() < 0.6
    method.flip_allowed = False
    assert torch.equal(method.crops(64, torch.Generator().manual_seed(4)),
                       method.crops(64, torch.Generator().manual_seed(4), flip=False))


def test_the_run_folder_records_the_source_images_with_their_hashes(tmp_path, digits_teacher):
    sources = _write_images(tmp_path / "frames" / "some_label", 3)
    result = DistillRun(_prior(options={"images": str(tmp_path / "frames")}), digits_teacher, tmp_path / "run").run()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = [{"name": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sources]
    for record in (config["resolved"]["source_images"], result["source_images"]):
        assert [{k: r[k] for k in ("name", "sha256")} for r in record] == expected
    assert not (tmp_path / "run" / "generator.pt").exists() and result["generator"] is None


def test_images_are_a_file_a_folder_or_a_glob_and_labels_are_ignored(tmp_path):
    first = _write_images(tmp_path / "a" / "cats", 2)
    second = _write_images(tmp_path / "a" / "dogs" / "deeper", 2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert image_files(str(first[0])) == [first[0].resolve()]
    assert image_files(str(tmp_path / "a")) == sorted(p.resolve() for p in first + second)
    assert image_files(str(tmp_path / "a" / "*" / "*.png")) == sorted(p.resolve() for p in first)
    with pytest.raises(DfadError, match="no image files"):
        image_files(str(tmp_path / "nothing*.png"))
    loaded = load_source_images(str(tmp_path / "a"), channels=1, shorter_side=20)
    assert len(loaded) == 4 and loaded.canvas.shape[1] == 1 and min(loaded.sizes[0].tolist()) == 20


def test_an_unreadable_image_among_the_sources_is_one_clear_line(tmp_path, digits_teacher):
    _write_images(tmp_path / "frames", 2)
    (tmp_path / "frames" / "broken.jpg").write_bytes(b"not a jpeg at all")
    result = run_cli("distill", "--teacher", digits_teacher, "--out", tmp_path / "run", "--images", tmp_path / "frames")
    assert result.exit_code != 0 and "broken.jpg" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_evaluation_set_is_refused_as_a_source(tmp_path, digits_teacher):
    """The same files as --eval-data (by path, or by content under another name) cannot be the images the student
    learns from."""
    test_folder = tmp_path / "eval" / "test"
    for label in range(10):
        _write_images(test_folder / str(label), 1, size=(8, 8), seed=label, channels=1)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "renamed.png").write_bytes((test_folder / "3" / "frame_0.png").read_bytes())
    for images in (test_folder / "3", copy):
        result = run_cli("distill", "--teacher", digits_teacher, "--out", tmp_path / "run", "--images", images,
                         "--eval-data", tmp_path / "eval")
        assert result.exit_code != 0 and "evaluation set" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_images_belong_to_the_prior_method(tmp_path, digits_teacher):
    _write_images(tmp_path / "frames", 1)
    result = run_cli("distill", "--teacher", digits_teacher, "--out", tmp_path / "run", "--method", "dfad",
                     "--images", tmp_path / "frames")
    assert result.exit_code != 0 and "--method prior" in result.output


def test_a_resumed_run_refuses_changed_source_images(tmp_path, digits_teacher):
    sources = _write_images(tmp_path / "frames", 2)
    config = _prior(options={"images": str(tmp_path / "frames")})
    DistillRun(config, digits_teacher, tmp_path / "run").run()
    _write_images(tmp_path / "frames", 2, seed=7)
    assert sources[0].exists()
    run = DistillRun(config, digits_teacher, tmp_path / "run", resume=True)
    with pytest.raises(DfadError, match="changed since this run started"):
        run.run()


def test_mixing_in_generator_images_keeps_their_share_of_every_batch(tmp_path, digits_teacher):
    run = DistillRun(_prior(options={"generator_fraction": 0.25, "cutmix": 0.0}), digits_teacher, tmp_path / "run")
    method = run.method
    torch.manual_seed(0)
    batch = method.student_batch()
    torch.manual_seed(0)
    crops = method.crops(24)
    with torch.no_grad(), run.setup.autocast():
        generated = method.adversary.synthesize(8).float()
    assert torch.allclose(batch, torch.cat([crops, generated]))
    images, logits = method.synthetic_batch(64, seed=5)
    again, _ = method.synthetic_batch(64, seed=5)
    assert len(images) == len(logits) == 64 and torch.equal(images, again)  # fixed images, comparable across epochs
