"""The TensorRT INT8 graph from NVIDIA's ModelOpt instead of ONNX Runtime's quantizer (``--int8-quantizer modelopt``).

ModelOpt's ONNX post-training quantization writes TensorRT's Q/DQ placement (skip input of residual Adds only) and
FP16 typing outside the Q/DQ pairs itself (``--high_precision_dtype fp16``), calibrating on arrays: synthetic images
work as well as real ones. dfad-edge's rule checker checks its graph like any other.

It is an optional extra: its ``onnx`` extra pins onnx (~=1.21) and ONNX Runtime (onnxruntime-gpu ~=1.24 on x86 Linux,
which must not share an environment with the onnxruntime package) and brings CUDA wheels of torch and cupy, so an
environment of its own is safest. It runs in a child process through its documented command line, because importing
it patches ONNX Runtime's calibrators for the whole process (measured with 0.47: ONNX Runtime's own quantize_static
then fails on the CPU graph).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import DfadError

INSTALL_HINT = ("--int8-quantizer modelopt needs NVIDIA ModelOpt in this environment: pip install 'dfad-edge[modelopt]' "
                "(it pins onnx and ONNX Runtime, so a venv of its own is safest), or use the default --int8-quantizer ort")
CALIBRATION_METHODS = {"minmax": "max", "entropy": "entropy"}


def run_modelopt(fp32_path: Path, calibration_images: torch.Tensor, arguments: list[str],
                 python: str = sys.executable) -> onnx.ModelProto:
    """``python -m modelopt.onnx.quantization`` on this graph and these calibration images, plus ``arguments``."""
    if python == sys.executable and importlib.util.find_spec("modelopt") is None:
        raise DfadError(INSTALL_HINT)
    with tempfile.TemporaryDirectory() as scratch:
        calibration, quantized = Path(scratch) / "calibration.npy", Path(scratch) / "int8.onnx"
        np.save(calibration, calibration_images.numpy().astype(np.float32))
        # Calibration on ONNX Runtime's CPU provider: a few hundred images, and no cuDNN or TensorRT library needs
        # to be on the library path.
        command = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32_path), "--quantize_mode", "int8",
                   "--calibration_data_path", str(calibration), "--calibration_eps", "cpu",
                   "--output_path", str(quantized), "--log_level", "WARNING", *arguments]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0 or not quantized.is_file():
            last_lines = " | ".join((finished.stderr or finished.stdout).strip().splitlines()[-3:])
            raise DfadError(f"ModelOpt could not quantize {fp32_path.name}: {last_lines}")
        return onnx.load(str(quantized))


def modelopt_arguments(calibrate_method: str, float_nodes: list[str]) -> list[str]:
    """ModelOpt's options for dfad-edge's choices: this calibration method, these nodes left in float."""
    if calibrate_method not in CALIBRATION_METHODS:
        raise DfadError(f"ModelOpt calibrates INT8 with {' or '.join(CALIBRATION_METHODS)}, not '{calibrate_method}'")
    arguments = ["--calibration_method", CALIBRATION_METHODS[calibrate_method]]
    if float_nodes:  # node names are regular expressions to ModelOpt
        arguments += ["--nodes_to_exclude", *[f"^{re.escape(name)}$" for name in float_nodes]]
    return arguments


def modelopt_int8_graph(fp32_path: Path, calibration_images: torch.Tensor, calibrate_method: str,
                        float_nodes: list[str], python: str = sys.executable) -> onnx.ModelProto:
    """ModelOpt's INT8 QDQ graph for TensorRT, FP16 outside the Q/DQ pairs, ``float_nodes`` left unquantized."""
    arguments = [*modelopt_arguments(calibrate_method, float_nodes), "--high_precision_dtype", "fp16"]
    return run_modelopt(fp32_path, calibration_images, arguments, python)
