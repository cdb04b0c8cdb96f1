"""Shared fixtures. Tests that need ../shared skip with a reason when it is absent (e.g. on a user's machine)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("DFAD_EDGE_QUIET", "1")
# --amp auto's measurements are cached here, not in the user's ~/.cache; the runs of one session share the decisions.
os.environ.setdefault("DFAD_EDGE_CACHE", tempfile.mkdtemp(prefix="dfad-edge-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DFAD_EDGE_SHARED", REPO.parent / "shared"))
CIFAR10_JPEG = SHARED / "data" / "cifar10-jpeg"
RESNET_WEIGHTS = SHARED / "weights" / "cifar10-resnet"
CIFAR10_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"

needs_shared = pytest.mark.skipif(not (CIFAR10_JPEG / "test").is_dir() or not RESNET_WEIGHTS.is_dir(),
                                  reason="../shared (CIFAR-10 JPEG and pretrained ResNets) is not available here")


def run_cli(*args: str):
    from dfad_edge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def shared_weight(prefix: str) -> Path:
    return next(RESNET_WEIGHTS.glob(f"{prefix}-*.th"))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A digits teacher trained the way a user would (train-teacher), shared by the tests that need one."""
    from dfad_edge.train_teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("digits-teacher")
    train_teacher(TeacherConfig(data="digits", arch="digits_cnn", epochs=20, batch_size=64, lr=0.05, device="cpu"), out)
    return out / "teacher.pt"


def distill_config(method: str = "pool", preset: str = "tiny", **changes):
    """A preset with loop options changed by keyword (e.g. epochs=2) and method options by 'options' (a dict)."""
    from dataclasses import replace

    from dfad_edge.distill import preset_config
    from dfad_edge.distill.config import with_epochs

    config = preset_config(method, preset, kind="tiny")
    option_changes = changes.pop("options", {})
    # The tests look at each epoch's checkpoint; the interval between checkpoints has its own test.
    changes.setdefault("checkpoint_minutes", 0.0)
    changed = replace(config, device="cpu", options=replace(config.options, **option_changes), **changes)
    # As --set epochs=N does: the preset's milestones move with its epochs unless the test sets them.
    return changed if "milestones" in option_changes else with_epochs(changed, changed.epochs, config.epochs)


@pytest.fixture(scope="session")
def distilled_digits(tmp_path_factory, digits_teacher) -> Path:
    """A run folder of the pool method's preset for a digits teacher (seed 0): student.pt, generator.pt,
    synthetic.pt, metrics, samples."""
    from dfad_edge.distill import DistillRun

    out = tmp_path_factory.mktemp("digits-distill") / "run"
    DistillRun(distill_config(), digits_teacher, out, eval_data="digits").run()
    return out


@pytest.fixture(scope="session")
def imported_resnet56(tmp_path_factory) -> Path:
    if not RESNET_WEIGHTS.is_dir():
        pytest.skip("../shared weights are not available here")
    out = tmp_path_factory.mktemp("resnet56") / "teacher.pt"
    result = run_cli("import", shared_weight("resnet56"), "--arch", "resnet56", "--mean", IMAGENET_MEAN,
                     "--std", IMAGENET_STD, "--classes", CIFAR10_CLASSES, "--out", out)
    assert result.exit_code == 0, result.output
    return out
