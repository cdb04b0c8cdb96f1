"""dfad-edge's self-describing model checkpoint, and import of a user's checkpoint into it.

A checkpoint holds only plain Python types and tensors, so it always loads with
``torch.load(..., weights_only=True)``: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .errors import DfadError
from .io import atomic_torch_save
from .models import build_kwargs, create_model, get_entry
from .models.registry import DEFAULT_CROP_PCT

FORMAT = "dfad-edge-checkpoint/1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "student", "teacher")
_PREFIXES = ("module.", "_orig_mod.")


TRANSFORMS = ("stretch", "center_crop")
INTERPOLATIONS = ("bilinear", "bicubic")
# Up to this size a model is CIFAR-style: trained and evaluated on whole images resized to its input ("stretch").
# Larger models are ImageNet-style and evaluated on a centre crop.
SMALL_IMAGE_LIMIT = 64


@dataclass
class InputSpec:
    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    # How an image of any size becomes height x width. "stretch": resized to exactly that (CIFAR-size models, and every
    # checkpoint written before this field existed). "center_crop": ImageNet-style evaluation, the shorter side resized
    # to size / crop_pct and the centre taken.
    transform: str = "stretch"
    crop_pct: float | None = None
    interpolation: str = "bilinear"  # of every resize (bicubic: what many timm weights were evaluated with)

    def validate(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DfadError(
                f"mean and std need one value per channel ({self.channels}); got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise DfadError(f"std values must be positive, got {self.std}")
        if self.transform not in TRANSFORMS:
            raise DfadError(f"unknown input transform '{self.transform}': choose {' or '.join(TRANSFORMS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise DfadError(f"unknown interpolation '{self.interpolation}': choose {' or '.join(INTERPOLATIONS)}")
        if self.transform == "center_crop" and not (self.crop_pct and 0 < self.crop_pct <= 1):
            raise DfadError(f"a centre crop needs a crop fraction in (0, 1], got {self.crop_pct}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class ModelCheckpoint:
    arch: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    input_spec: InputSpec
    state_dict: dict[str, torch.Tensor]
    class_names: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        """The architecture with these weights loaded strictly, in eval mode."""
        model = create_model(self.arch, **self.arch_kwargs)
        load_weights_strictly(model, self.state_dict, self.arch)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names else None,
            "input_spec": asdict(self.input_spec),
            "state_dict": self.state_dict,
            "provenance": dict(self.provenance),
        }

    def save(self, path: Path) -> None:
        atomic_torch_save(self.to_dict(), path)

    def describe(self) -> str:
        spec = self.input_spec
        crop = (f", evaluated on a centre crop of {spec.crop_pct:g} ({spec.interpolation} resize)"
                if spec.transform == "center_crop" else "")
        return (
            f"{self.arch} ({self.num_classes} classes, input {spec.channels}x{spec.height}x{spec.width}{crop}, "
            f"made by {self.provenance.get('command', 'unknown')})"
        )


def model_checkpoint(model: nn.Module, arch: str, arch_kwargs: dict, num_classes: int, input_spec: InputSpec,
                     class_names: list[str] | None, command: str, **extra_provenance) -> ModelCheckpoint:
    state = {k: v.detach().cpu().clone() for k, v in _unwrap_compiled(model).state_dict().items()}
    provenance = {"command": command, "dfad_edge_version": __version__, **extra_provenance}
    return ModelCheckpoint(arch, arch_kwargs, num_classes, input_spec, state, class_names, provenance)


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True and one clear error for every way a file can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise DfadError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # Garbage bytes look like an exotic pickle protocol; the error below says what is wrong in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code_reference = re.search(r"GLOBAL (\S+)", str(exc))
        if code_reference:
            raise DfadError(
                f"refused to load {path}: it references Python code ({code_reference.group(1)}), which could run "
                "arbitrary commands when unpickled. Re-save only the state_dict (torch.save(model.state_dict(), ...)) "
                "from a trusted environment."
            ) from None
        raise DfadError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not saved with "
                        "torch.save)") from None
    except Exception as exc:  # noqa: BLE001 - on garbage bytes the unpickler can raise almost anything (KeyError, struct.error, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfadError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {first_line}") from None


def load_checkpoint(path: Path) -> ModelCheckpoint:
    raw = safe_torch_load(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DfadError(
            f"{path} is not a dfad-edge checkpoint. Convert it first: "
            f"dfad-edge import {path} --arch NAME --mean ... --std ... --out model.pt"
        )
    spec = InputSpec(**raw["input_spec"])
    return ModelCheckpoint(
        arch=raw["arch"], arch_kwargs=raw["arch_kwargs"], num_classes=int(raw["num_classes"]), input_spec=spec,
        state_dict=raw["state_dict"], class_names=raw.get("class_names"), provenance=raw.get("provenance") or {},
    )


def extract_state_dict(raw: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the weights in the usual wrappings: raw state_dict, {"state_dict": ...}, {"model": ...}, module. prefixes."""
    candidate = raw
    while isinstance(candidate, dict) and not _is_tensor_mapping(candidate):
        inner = next((candidate[k] for k in _WRAPPER_KEYS if isinstance(candidate.get(k), dict)), None)
        if inner is None:
            break
        candidate = inner
    if not isinstance(candidate, dict) or not _is_tensor_mapping(candidate):
        found = sorted(raw.keys())[:10] if isinstance(raw, dict) else type(raw).__name__
        raise DfadError(f"{source} holds no state_dict of tensors (found: {found})")
    return {_strip_prefixes(k): v for k, v in candidate.items() if isinstance(v, torch.Tensor)}


def _is_tensor_mapping(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(v, torch.Tensor) for v in mapping.values())


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_weights_strictly(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """Strict loading whose error names the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    state_dict = _with_bn_counters(state_dict, expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise DfadError(f"weights do not fit architecture '{arch}': " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _with_bn_counters(state_dict: dict, expected: dict) -> dict:
    """Checkpoints saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked counters, which
    do not affect inference (PyTorch itself fills them in for such files); every other key stays strict."""
    filled = dict(state_dict)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(value)
    return filled


def infer_num_classes(state_dict: dict[str, torch.Tensor]) -> int:
    """The classifier is the last 2-D weight in every supported architecture."""
    matrices = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise DfadError("cannot infer the number of classes (no linear layer found); pass --num-classes")
    return int(matrices[-1].shape[0])


def infer_in_channels(state_dict: dict[str, torch.Tensor]) -> int:
    convs = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 4]
    return int(convs[0].shape[1]) if convs else 3


def imported_input_spec(arch: str, in_channels: int, mean: list[float] | None, std: list[float] | None,
                        input_size: tuple[int, int] | None, transform: str | None,
                        crop_pct: float | None) -> tuple[InputSpec, list[str]]:
    """The input spec of an imported model (None: the architecture's default), and the values taken from the
    architecture's pretrained config (a timm or torchvision model's weights record their input size, mean, std and
    evaluation crop) rather than from the user."""
    entry = get_entry(arch)
    pretrained, defaulted = entry.pretrained, []
    if (mean is None) != (std is None):
        raise DfadError("give --mean and --std together (or neither, for an architecture with a pretrained config)")
    if mean is None:
        if pretrained is None or len(pretrained.mean) != in_channels:
            raise DfadError(f"--mean and --std are needed: {arch} carries no normalisation of its own for "
                            f"{in_channels}-channel images; give the values the model was trained with")
        mean, std = list(pretrained.mean), list(pretrained.std)
        defaulted.append(f"mean {_numbers(mean)}, std {_numbers(std)}")
    height, width = input_size or entry.input_size
    if input_size is None and pretrained is not None:
        defaulted.append(f"input size {height}x{width}")
    transform = transform or ("stretch" if max(height, width) <= SMALL_IMAGE_LIMIT else "center_crop")
    if transform == "center_crop" and crop_pct is None:
        crop_pct = pretrained.crop_pct if pretrained else DEFAULT_CROP_PCT
        if pretrained is not None:
            defaulted.append(f"centre crop {crop_pct:g}")
    # The library's resize for ImageNet-style evaluation; CIFAR-style models see images resized as they were trained.
    interpolation = pretrained.interpolation if pretrained and transform == "center_crop" else "bilinear"
    if interpolation != "bilinear":
        defaulted.append(f"{interpolation} resize")
    spec = InputSpec(in_channels, height, width, list(mean), list(std), transform,
                     crop_pct if transform == "center_crop" else None, interpolation)
    spec.validate()
    return spec, defaulted


def _numbers(values: list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def import_checkpoint(file: Path, arch: str, mean: list[float] | None = None, std: list[float] | None = None,
                      class_names: list[str] | None = None, num_classes: int | None = None,
                      input_size: tuple[int, int] | None = None, transform: str | None = None,
                      crop_pct: float | None = None) -> ModelCheckpoint:
    """Convert a user's checkpoint (any common wrapping) into a verified dfad-edge checkpoint. Input values the user
    left out and the architecture's pretrained config supplied are named in provenance["from_pretrained_config"]."""
    state_dict = extract_state_dict(safe_torch_load(file), str(file))
    num_classes = num_classes or infer_num_classes(state_dict)
    if class_names is not None and len(class_names) != num_classes:
        raise DfadError(f"--classes lists {len(class_names)} names but the checkpoint has {num_classes} classes")
    in_channels = infer_in_channels(state_dict)
    spec, defaulted = imported_input_spec(arch, in_channels, mean, std, input_size, transform, crop_pct)
    arch_kwargs = build_kwargs(arch, num_classes, in_channels, (spec.height, spec.width))
    provenance = {"command": "import", "source_file": str(file), "dfad_edge_version": __version__}
    if defaulted:
        provenance["from_pretrained_config"] = defaulted
    checkpoint = ModelCheckpoint(arch, arch_kwargs, num_classes, spec, state_dict, class_names, provenance)
    checkpoint.build_model()  # verifies that the weights fit before anything is written
    return checkpoint
