"""A frozen network (the teacher) made faster for inference without changing what it computes.

The distillation loop runs the frozen teacher about six times per DFAD iteration. In eval mode a BatchNorm is a fixed
per-channel affine map, so conv -> BN is one convolution with rescaled weights and a bias; without its BatchNorm passes
(memory-bound on a CPU) the teacher forward takes about a fifth less time. Under autocast, the weights of convolutions
and linear layers are cast to the autocast type on every call (frozen weights are not cached); cast once, they are not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

# Exactly these types (as torch.fx's fuse matches them): a subclass may compute with its weight in its own way.
CAST_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Folded:
    module: nn.Module  # the folded copy, or the original where nothing was folded
    layers: int  # BatchNorm layers folded away
    reason: str  # why nothing was folded, else ""


def full_fp32_convolutions():
    """cuDNN's TF32 convolutions (on by default) round both sides of the check differently; compare in full fp32."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _batchnorm_calls(graph_module) -> int:
    """BatchNorm layers the traced forward runs (a model may hold others it never calls, e.g. auxiliary heads)."""
    modules = dict(graph_module.named_modules())
    return sum(node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm)
               for node in graph_module.graph.nodes)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> Folded:
    """A copy of ``model`` (eval mode, frozen) with every conv -> BatchNorm pair folded, checked against the original
    on ``example``. The original comes back, untouched, where the model cannot be traced (data-dependent control flow),
    holds no such pair, or the copy disagrees."""
    import torch.fx as fx  # costs import time; only the distill loop needs it
    from torch.fx.experimental.optimization import fuse

    try:
        traced = fx.symbolic_trace(model)  # shares the original's layers; fuse below works on a deep copy
    except Exception as error:  # symbolic tracing raises many kinds of errors on untraceable models
        return Folded(model, 0, f"not traceable ({type(error).__name__})")
    before = _batchnorm_calls(traced)
    if before == 0:
        return Folded(model, 0, "no BatchNorm layers")
    folded = fuse(traced, no_trace=True)
    layers = before - _batchnorm_calls(folded)
    if layers == 0:
        return Folded(model, 0, "no convolution followed only by a BatchNorm")
    folded.eval().requires_grad_(False)
    with torch.no_grad(), full_fp32_convolutions():
        agree = outputs_agree(model(example), folded(example), relative=1e-3)
    if not agree:
        return Folded(model, 0, "the folded copy did not reproduce the original's outputs")
    return Folded(folded, layers, "")


def outputs_agree(expected: torch.Tensor, actual: torch.Tensor, relative: float, floor: float = 1.0) -> bool:
    """Equal within ``relative`` of the largest expected output, or of ``floor`` if that is larger (logits of any
    scale, rounding of any precision; a small floor for activations that may all be well below 1)."""
    expected, actual = expected.float(), actual.float()
    return torch.allclose(actual, expected, rtol=0, atol=relative * max(floor, float(expected.abs().max())))


def cast_if_it_agrees(reference: nn.Module, module: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` cast for autocast (cast_for_autocast), or ``module`` itself where the copy then fails under
    autocast or disagrees with ``reference`` beyond rounding (a layer that computes outside autocast, fp16 underflow of
    folded weights)."""
    cast = copy.deepcopy(module)
    cast_for_autocast(cast, dtype)
    try:
        with torch.no_grad(), torch.autocast(device_type=example.device.type, dtype=dtype):
            agree = outputs_agree(reference(example), cast(example), relative=0.05)
    except RuntimeError:  # e.g. a dtype mismatch where a model switches autocast off around a layer
        return module
    return cast if agree else module


def cast_for_autocast(module: nn.Module, dtype: torch.dtype) -> None:
    """Convolution and linear weights (and biases) stored in ``dtype``: what autocast would cast them to on every call,
    so the results are the same; other layers (BatchNorm, LayerNorm) keep fp32, as autocast keeps them. The module must
    then run under autocast of ``dtype``."""
    for layer in module.modules():
        if type(layer) in CAST_TYPES and not hasattr(layer, "parametrizations"):
            layer.to(dtype)


def expose_outputs(module: nn.Module, names: list[str]) -> list[str] | None:
    """The names of modules whose forward hooks see the outputs of ``module``'s submodules ``names``: the submodules
    themselves in a module, in a traced (folded) copy identity layers inserted after the last node each submodule
    made (torch.fx keeps every node's module path; the copy never calls its containers). None where a submodule
    left no node in the graph."""
    import torch.fx as fx

    if not isinstance(module, fx.GraphModule):
        return names
    graph, lasts = module.graph, []
    for name in names:  # all found before the graph changes, so a missing one leaves it as it was
        made = [node for node in graph.nodes if name in node.meta.get("nn_module_stack", {})]
        if not made:
            return None
        lasts.append(made[-1])
    taps = [f"output_of_{name.replace('.', '_')}" for name in names]
    for tap, last in zip(taps, lasts):
        if hasattr(module, tap):  # exposed before (another method built on the same copy)
            continue
        module.add_submodule(tap, nn.Identity())
        with graph.inserting_after(last):
            node = graph.call_module(tap, (last,))
        last.replace_all_uses_with(node, delete_user_cb=lambda user, node=node: user is not node)
    module.recompile()
    return taps


class CompiledInference:
    """The frozen teacher's forwards without gradients (every student step's targets) through torch.compile with
    freezing: weights become constants, so convolutions get pre-packed weights and fused activations (about 5% more
    DFAD iterations per second on a Zen 4 CPU, for ~5 s of compilation per input shape). Forwards with gradients (the
    generator's steps) run eager. Where compilation fails (no C++ compiler, an unsupported layer) the module runs
    eager from then on, after one line saying so."""

    def __init__(self, module: nn.Module, on_failure):
        self.module, self.on_failure = module, on_failure
        # options: freezing for this module alone (a global switch would freeze the student's no-grad graphs too,
        # which would then evaluate stale weights); one graph per input shape, no dynamic shapes.
        self.compiled = torch.compile(module, options={"freezing": True}, dynamic=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.compiled is None:
            return self.module(images)
        try:
            return self.compiled(images)
        except Exception as error:  # compilation raises many kinds of errors (compiler missing, lowering, codegen)
            self.compiled = None
            self.on_failure(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            return self.module(images)
