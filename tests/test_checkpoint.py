import os
import pickle

import numpy as np
import pytest
import torch

from conftest import run_cli
from dfad_edge.checkpoint import import_checkpoint, load_checkpoint, safe_torch_load
from dfad_edge.errors import DfadError
from dfad_edge.models import create_model

MEAN, STD = [0.5], [0.25]


def _weights():
    torch.manual_seed(0)
    return create_model("digits_cnn_small").state_dict()


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix", "nested"])
def test_import_accepts_the_usual_wrappings(tmp_path, wrap):
    weights = _weights()
    payload = {
        "raw": weights,
        "state_dict": {"state_dict": weights, "best_prec1": 90.0},
        "model": {"model": weights, "epoch": 3},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in weights.items()}},
        "nested": {"checkpoint": 1, "model": {"state_dict": weights}},
    }[wrap]
    torch.save(payload, tmp_path / "user.pth")
    checkpoint = import_checkpoint(tmp_path / "user.pth", "digits_cnn_small", MEAN, STD)
    assert checkpoint.num_classes == 10 and checkpoint.input_spec.channels == 1
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in weights.items())


def test_checkpoint_is_self_describing_and_round_trips(tmp_path):
    torch.save(_weights(), tmp_path / "user.pth")
    names = [f"digit{i}" for i in range(10)]
    checkpoint = import_checkpoint(tmp_path / "user.pth", "digits_cnn_small", MEAN, STD, class_names=names)
    checkpoint.save(tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.arch == "digits_cnn_small" and loaded.class_names == names
    assert (loaded.input_spec.height, loaded.input_spec.width) == (8, 8)
    assert loaded.provenance["command"] == "import"
    images = torch.randn(3, 1, 8, 8)
    assert torch.allclose(loaded.build_model()(images), checkpoint.build_model()(images))


def _cli_error(*args):
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_random_bytes_never_escape_as_a_traceback(tmp_path):
    # Garbage bytes make the unpickler fail in many ways (KeyError, struct.error, UnicodeDecodeError, ...); every one
    # must become the same clear error. Seeded, so a failure here is reproducible.
    rng = np.random.default_rng(0)
    for index in range(200):
        path = tmp_path / f"garbage{index}.pt"
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(DfadError, match="not a readable PyTorch checkpoint"):
            safe_torch_load(path)


def test_corrupt_and_truncated_files_give_one_clear_line(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(2048))
    torch.save(_weights(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    for name in ("corrupt.pt", "truncated.pt"):
        output = _cli_error("import", tmp_path / name, "--arch", "digits_cnn_small", "--mean", "0.5", "--std", "0.25",
                            "--out", tmp_path / "x.pt")
        assert "not a readable PyTorch checkpoint" in output
        assert len(output.strip().splitlines()) <= 3  # one message, possibly soft-wrapped by the terminal


def test_a_pickle_that_is_not_a_checkpoint_is_rejected(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(DfadError, match="no state_dict"):
        import_checkpoint(tmp_path / "list.pt", "digits_cnn_small", MEAN, STD)


def test_weights_for_another_architecture_name_the_bad_keys(tmp_path):
    torch.save(_weights(), tmp_path / "user.pth")
    with pytest.raises(DfadError) as error:
        import_checkpoint(tmp_path / "user.pth", "resnet20", MEAN, STD)
    message = str(error.value)
    assert "missing" in message and "unexpected" in message and "resnet20" in message
    wide = create_model("digits_cnn").state_dict()
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(DfadError, match="mis-shaped"):
        import_checkpoint(tmp_path / "wide.pth", "digits_cnn_small", MEAN, STD)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    torch.save({"state_dict": _weights(), "payload": _RunsCode()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"payload": _RunsCode()}, handle, protocol=2)
    for name in ("evil.pt", "evil.pkl"):
        output = _cli_error("import", tmp_path / name, "--arch", "digits_cnn_small", "--mean", "0.5", "--std", "0.25",
                            "--out", tmp_path / "x.pt")
        assert "refused" in output and "system" in output
    assert not _RunsCode.marker.exists()


def test_commands_tell_how_to_convert_a_foreign_checkpoint(tmp_path):
    torch.save(_weights(), tmp_path / "user.pth")
    output = _cli_error("eval", tmp_path / "user.pth", "--data", "digits")
    assert "dfad-edge import" in output


def test_bad_normalisation_lists_are_clear_errors(tmp_path):
    torch.save(_weights(), tmp_path / "user.pth")
    output = _cli_error("import", tmp_path / "user.pth", "--arch", "digits_cnn_small", "--mean", "0.5,0.5",
                        "--std", "0.25", "--out", tmp_path / "x.pt")
    assert "one value per channel" in output
    output = _cli_error("import", tmp_path / "user.pth", "--arch", "digits_cnn_small", "--mean", "abc",
                        "--std", "0.25", "--out", tmp_path / "x.pt")
    assert "comma-separated numbers" in output


def test_a_checkpoint_written_before_input_transforms_loads_as_stretched(tmp_path):
    torch.save(_weights(), tmp_path / "user.pth")
    raw = import_checkpoint(tmp_path / "user.pth", "digits_cnn_small", MEAN, STD).to_dict()
    del raw["input_spec"]["transform"], raw["input_spec"]["crop_pct"]  # what earlier versions wrote
    torch.save(raw, tmp_path / "old.pt")
    spec = load_checkpoint(tmp_path / "old.pt").input_spec
    assert (spec.transform, spec.crop_pct) == ("stretch", None)


def test_import_takes_what_is_not_given_from_the_pretrained_config_and_says_so(tmp_path):
    torch.save(create_model("timm.resnet18.a1_in1k", num_classes=5).state_dict(), tmp_path / "user.pth")
    result = run_cli("import", tmp_path / "user.pth", "--arch", "timm.resnet18.a1_in1k", "--out", tmp_path / "t.pt")
    assert result.exit_code == 0, result.output
    assert "pretrained config" in result.output and "centre crop 0.95" in result.output
    assert "bicubic resize" in result.output  # these weights were evaluated with a bicubic resize
    spec = load_checkpoint(tmp_path / "t.pt").input_spec
    assert (spec.height, spec.mean, spec.transform, spec.crop_pct) == (224, [0.485, 0.456, 0.406], "center_crop", 0.95)
    assert spec.interpolation == "bicubic"
    # What the user gives wins; a 32x32 model is evaluated CIFAR-style, on the whole image.
    result = run_cli("import", tmp_path / "user.pth", "--arch", "timm.resnet18.a1_in1k", "--mean", "0.5,0.5,0.5",
                     "--std", "0.2,0.2,0.2", "--input-size", "32", "--out", tmp_path / "cifar.pt")
    assert result.exit_code == 0 and "pretrained config" not in result.output
    spec = load_checkpoint(tmp_path / "cifar.pt").input_spec
    assert (spec.height, spec.mean, spec.transform, spec.interpolation) == (32, [0.5] * 3, "stretch", "bilinear")
    # An architecture without a normalisation of its own needs --mean and --std.
    torch.save(_weights(), tmp_path / "digits.pth")
    assert "--mean and --std are needed" in _cli_error("import", tmp_path / "digits.pth", "--arch", "digits_cnn_small",
                                                        "--out", tmp_path / "d.pt")
