"""Stage 1: data-free adversarial distillation (generator vs student, teacher as judge)."""

from .config import PRESETS, DistillConfig, LossConfig, preset_config
from .trainer import DistillRun, RunInterrupted, load_generator

__all__ = ["PRESETS", "DistillConfig", "DistillRun", "LossConfig", "RunInterrupted", "load_generator", "preset_config"]
