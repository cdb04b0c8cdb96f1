"""Unlabeled source images for the image-prior method: a few public-domain photographs that ship inside scikit-image
(no download), or a user's own images (``--images``: a file, a folder or a glob; labels and folder names ignored).

Every image is resized so its shorter side is ``shorter_side`` pixels and kept as uint8 on one padded canvas, with its
own height and width, so crops of any source are cut in one batched call (distill/augment.py). Each source is recorded
by name and content hash, so a user can show what the student saw.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DfadError
from .sources import IMAGE_EXTENSIONS

BUILTIN = "builtin"
# Photographs that ship inside installed packages (no download): scikit-image's own distribution (public domain or
# CC0) and scikit-learn's two sample images. People, an animal, food, vehicles, a building, a flower, a sky, and
# greyscale textures and scenes. Several scenes give more varied crops than one.
BUILTIN_PHOTOS = {
    "astronaut": "skimage", "chelsea": "skimage", "coffee": "skimage", "rocket": "skimage",
    "stereo_motorcycle": "skimage", "hubble_deep_field": "skimage", "camera": "skimage", "brick": "skimage",
    "grass": "skimage", "gravel": "skimage", "coins": "skimage", "clock": "skimage", "moon": "skimage",
    "china": "sklearn", "flower": "sklearn",
}
# All of them by default: 15 sources measured 19.6% against 6 colour ones' 17.8% (CIFAR-10, 2-minute budget, docs/results.md).
DEFAULT_BUILTIN = tuple(BUILTIN_PHOTOS)
# Above this many files a folder is a data set, not a handful of frames: the canvas would not fit in memory.
MAX_SOURCES = 4096
MAX_CANVAS_BYTES = 4 * 2**30


@dataclass
class SourceImages:
    canvas: torch.Tensor  # N x C x H x W uint8, each image at its top-left corner
    sizes: torch.Tensor  # N x 2 (height, width) of each image on the canvas
    records: list[dict]  # per image: name (path or skimage:<name>), sha256 of its content, original height and width

    def __len__(self) -> int:
        return len(self.records)


def load_source_images(spec: str, channels: int, shorter_side: int) -> SourceImages:
    """``spec``: ``builtin`` (the default photographs), ``builtin:NAME,NAME,...`` (chosen ones) or a path, folder or
    glob of images. ``channels``: the teacher's (1 = greyscale)."""
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        names = spec.partition(":")[2].split(",") if ":" in spec else DEFAULT_BUILTIN
        named = [(name, array, {"pixels_sha256": hashlib.sha256(array.tobytes()).hexdigest()})
                 for name, array in _builtin_arrays(names)]
    else:
        named = [(str(path), _read_image(path), {"sha256": file_sha256(path)}) for path in image_files(spec)]
    images, records = [], []
    for name, array, digest in named:
        tensor = _to_channels(torch.from_numpy(np.array(array)), channels)  # a copy: the array may be read-only
        records.append({"name": name, **digest, "height": int(array.shape[0]), "width": int(array.shape[1])})
        images.append(_resize_shorter_side(tensor, shorter_side))
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    if len(images) * channels * height * width > MAX_CANVAS_BYTES:
        raise DfadError(f"{len(images)} source images at {shorter_side} px on their shorter side need "
                        f"{len(images) * channels * height * width / 2**30:.1f} GiB: use fewer images or a smaller "
                        "source_size (--set source_size=...)")
    canvas = torch.zeros(len(images), channels, height, width, dtype=torch.uint8)
    for index, image in enumerate(images):
        canvas[index, :, :image.shape[1], :image.shape[2]] = image
    sizes = torch.tensor([[image.shape[1], image.shape[2]] for image in images])
    return SourceImages(canvas, sizes, records)


def image_files(spec: str) -> list[Path]:
    """The image files a file, a folder (searched recursively) or a glob names, sorted; a clear error when none."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DfadError(f"--images {spec}: no image files there ({', '.join(IMAGE_EXTENSIONS)}); give a file, a folder "
                        "or a quoted glob such as 'frames/*.jpg'")
    if len(files) > MAX_SOURCES:
        raise DfadError(f"--images {spec}: {len(files)} images; at most {MAX_SOURCES} are held in memory as sources. "
                        "Give a folder or glob of fewer (a few hundred varied frames are plenty)")
    return [p.resolve() for p in files]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_evaluation_images(records: list[dict], evaluation_files: list[Path], eval_data: str) -> None:
    """A source that is one of the evaluation images (the same path or the same bytes) would make the test figure a
    measure of memory, not of distillation: refused."""
    paths = {str(Path(p).resolve()) for p in evaluation_files}
    sources = [r for r in records if "sha256" in r]
    if not sources:
        return
    hashes = {file_sha256(Path(p)) for p in evaluation_files} if evaluation_files else set()
    for record in sources:
        if record["name"] in paths or record["sha256"] in hashes:
            raise DfadError(f"--images holds {record['name']}, an image of the evaluation set --eval-data {eval_data}: "
                            "distil from images that are not the test set, or evaluate on another set")


def _builtin_arrays(names) -> list[tuple[str, np.ndarray]]:
    unknown = [name for name in names if name not in BUILTIN_PHOTOS]
    if unknown:
        raise DfadError(f"no built-in photograph named {', '.join(unknown)}: choose from {', '.join(BUILTIN_PHOTOS)}")
    arrays = []
    for name in names:
        if BUILTIN_PHOTOS[name] == "sklearn":
            from sklearn.datasets import load_sample_image

            image = load_sample_image(f"{name}.jpg")
        else:
            try:
                import skimage.data
            except ImportError:
                raise DfadError("the built-in source photographs need scikit-image, a dependency of dfad-edge that "
                                "is not installed here: pip install scikit-image") from None
            image = getattr(skimage.data, name)()
        arrays.append((f"{BUILTIN_PHOTOS[name]}:{name}", image[0] if isinstance(image, tuple) else image))  # stereo: left
    return arrays


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DfadError(f"--images: cannot read {path} ({exc}); remove it or fix it") from None


def _to_channels(array: torch.Tensor, channels: int) -> torch.Tensor:
    """H x W or H x W x C uint8 to C x H x W with the teacher's channel count (greyscale by ITU-R 601 luma)."""
    image = array[..., None] if array.dim() == 2 else array[..., :3]
    image = image.permute(2, 0, 1)
    if channels == image.shape[0]:
        return image
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (image.float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return image[:1].expand(channels, -1, -1).clone()


def _resize_shorter_side(image: torch.Tensor, shorter_side: int) -> torch.Tensor:
    height, width = image.shape[1:]
    factor = shorter_side / min(height, width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)
