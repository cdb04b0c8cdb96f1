"""Stage 1: data-free distillation. One loop (loop.py) shared by every method; one file per method (dfad.py, pool.py,
prior.py)."""

from . import dfad, pool, prior  # noqa: F401  (registration side effects)
from .config import PRESETS, DistillConfig, apply_overrides, options_reference, preset_config, teacher_kind
from .loop import DistillRun, RunInterrupted, load_synthetic_images
from .method import METHODS

__all__ = ["METHODS", "PRESETS", "DistillConfig", "DistillRun", "RunInterrupted", "apply_overrides",
           "load_synthetic_images", "options_reference", "preset_config", "teacher_kind"]
