"""Data-parallel runs on torch.distributed: ``torchrun --nproc-per-node N -m dfad_edge distill ...`` runs one run as N
ranks, each computing its share of every batch. Launched without torchrun, a command is one process and every helper
here is the identity, so the single-process path is unchanged.

How N ranks of batch B/N mean what one process of batch B means. Let each rank's loss be its terms over its share
(per-sample means) plus the terms over the whole batch (equal on every rank); the run's loss is the mean of the ranks'.
- Weights every rank trains (student, generator) get their gradients averaged over ranks: DistributedDataParallel, or
  average_gradients for a module made afresh per batch.
- A term over the whole batch (BatchNorm statistics, the mean class distribution) is formed from sums added over ranks
  by a differentiable all-reduce (sum_over_ranks). Its backward is an all-reduce too, so each rank's backward yields the
  gradient of the sum of all ranks' losses, which the averaging above turns into the run's loss's gradient.
- A per-sample mean needs nothing: over equal shares, the mean of the ranks' means is the whole batch's mean.
- A tensor only one rank holds that an optimiser steps (the pool method's per-batch latents) has no averaging to undo
  that factor of N: rank_local_leaf divides its gradient by N.
- BatchNorm layers in training mode normalise with the whole batch's statistics (SyncBatchNorm).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import fields, replace
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .errors import DfadError
from .runtime import resolve_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 alone evaluates on the test set and writes the run folder while the other ranks wait at their next collective;
# NCCL's default wait (10 minutes) can be shorter than a large test set's evaluation.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# Where a failing rank leaves its message in torchrun's key-value store, and how often the other ranks look.
FAILURE_KEY = "dfad_edge/failed_rank"
FAILURE_POLL_S = 0.5
# A rank that sees another's failure gives its own main thread this long to fail too (a failure every rank decided
# together, e.g. a NaN loss, ends each rank by itself) before it stops the process.
FAILURE_GRACE_S = 5.0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the one that writes the run folder and speaks for the run."""
    return rank() == 0


def spans_ranks() -> bool:
    """More than one rank: reductions have something to add (a torchrun run of one rank skips them, as PyTorch's
    SyncBatchNorm does)."""
    return world_size() > 1


@contextmanager
def torchrun_process_group(device_name: str) -> Iterator[None]:
    """Launched by torchrun: join its process group (NCCL for a CUDA device, gloo for the CPU) with this rank's GPU,
    cuda:LOCAL_RANK, as the current device, and leave the group on the way out. Otherwise: nothing, one process."""
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    device = rank_device(resolve_device(device_name))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        watch = FailureWatch()
    except BaseException:
        dist.destroy_process_group()
        raise
    try:
        yield
    except BaseException as error:
        # The traceback's finished frames hold the run (and its DDP wrappers, which hold the process group): let go
        # of their locals so the collection below can free them.
        traceback.clear_frames(error.__traceback__)
        if watch.seen is not None:  # this rank's collective broke because another rank failed: say why
            raise DfadError(f"{watch.seen}; rank {rank()} stopped too") from None
        if not isinstance(error, (KeyboardInterrupt, SystemExit)) and not getattr(error, "every_rank_stops", False):
            watch.report(error)
        raise
    finally:
        watch.stop()
        dist.destroy_process_group()
        # Whatever still holds the process group (a finished run's DDP wrappers, often in reference cycles) would
        # otherwise be freed during interpreter shutdown, where gloo's threads abort the process ("terminate called
        # without an active exception"); collected now, the group shuts down while the interpreter is whole.
        gc.collect()


class FailureWatch:
    """A rank that fails (out of memory, disk full, a bad image) leaves its message in torchrun's store; every other
    rank, which may be blocked in a collective waiting for it (up to COLLECTIVE_TIMEOUT, and forever for a NCCL
    peer that died), sees it within a second and stops with that message: by its own error if the collective breaks
    (gloo does when the peer leaves), else by printing it and ending its process. Stops every rank decides together
    (a signal, a NaN loss) raise on each rank by itself and are not reported here."""

    def __init__(self):
        # The default group's store: the one torchrun's rendezvous made (private in PyTorch, stable since 1.x).
        self.store = dist.distributed_c10d._get_default_store()
        self.leaving = threading.Event()
        self.seen: str | None = None  # another rank's failure, once seen
        threading.Thread(target=self._watch, name="dfad-edge-failure-watch", daemon=True).start()

    def report(self, error: BaseException) -> None:
        message = error.user_message() if isinstance(error, DfadError) else f"{type(error).__name__}: {error}"
        try:
            self.store.set(FAILURE_KEY, f"rank {rank()} failed: {message}")
        except Exception:  # noqa: BLE001 - the store's host may be the rank that died; the error still propagates
            return
        # Leaving closes this rank's connections, which breaks the others' collectives: let them read why first.
        self.leaving.wait(2 * FAILURE_POLL_S)

    def stop(self) -> None:
        self.leaving.set()

    def _watch(self) -> None:
        while not self.leaving.wait(FAILURE_POLL_S):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                message = self.store.get(FAILURE_KEY).decode()
            except Exception:  # noqa: BLE001 - rank 0 hosts the store: gone, its own error speaks for the run
                return
            if message.startswith(f"rank {rank()} "):
                return
            self.seen = message
            if self.leaving.wait(FAILURE_GRACE_S):
                return  # this rank's main thread ended by itself
            print(f"error: {message}; rank {rank()} stopped too", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread is blocked in a collective that would wait for the failed rank


def local_rank() -> int:
    """This rank's index on its machine (torchrun's LOCAL_RANK); 0 in one process."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


@contextmanager
def local_main_first() -> Iterator[None]:
    """The first rank of each machine runs the block before the machine's other ranks do (e.g. a download into that
    machine's data folder, which the others then find on disk)."""
    if not spans_ranks():
        yield
        return
    if local_rank() != 0:
        dist.barrier()
    yield
    if local_rank() == 0:
        dist.barrier()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: under torchrun one GPU per rank, cuda:LOCAL_RANK; otherwise ``device``."""
    if not launched_by_torchrun() or device.type != "cuda":
        return device
    if device.index is not None:
        raise DfadError(f"--device {device}: under torchrun each rank uses the GPU of its LOCAL_RANK; pass --device cuda "
                        "(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


# --- the configuration: global batch sizes, a share per rank ---------------------------------------------------------
def rank_share(value: int, name: str) -> int:
    """This rank's equal share of a count that is the whole run's (a batch size, a pool's capacity)."""
    ranks = world_size()
    if value % ranks:
        raise DfadError(f"{name}={value} cannot be split evenly across {ranks} ranks: batch and pool sizes are the whole "
                        f"run's and every rank takes an equal share. Use a multiple of {ranks}, e.g. "
                        f"{name}={-(-value // ranks) * ranks}")
    return value // ranks


def split_across_ranks(options):
    """A method's options as one rank uses them: each option declared ``split`` takes this rank's share."""
    if world_size() == 1:
        return options
    return replace(options, **{item.name: rank_share(getattr(options, item.name), item.name)
                               for item in fields(options) if item.metadata.get("split")})


# --- reductions ------------------------------------------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """An all-reduce whose backward all-reduces the gradients (what torch.distributed.nn.functional.all_reduce does;
    deprecated there, and its functional successor has a gradient only in recent PyTorch versions)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(gradient)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor added up over all ranks, on every rank. Differentiable: the backward is an all-reduce as well, so
    each rank's share receives the gradient of every rank's use of the sum."""
    return _SumOverRanks.apply(tensor) if spans_ranks() else tensor


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of the ranks' tensors: the whole batch's mean where each is a mean over an equal share."""
    return sum_over_ranks(tensor) / world_size()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """What DDP does for the modules it wraps, in one all-reduce, for a module made afresh for every batch (the pool
    method's generator copy), where wrapping would cost a DDP construction, with its broadcasts, per batch."""
    if not spans_ranks():
        return
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not gradients:
        return
    flat = torch._utils._flatten_dense_tensors(gradients)
    dist.all_reduce(flat)
    flat /= world_size()
    for gradient, averaged in zip(gradients, torch._utils._unflatten_dense_tensors(flat, gradients)):
        gradient.copy_(averaged)


def rank_local_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A learnable tensor only this rank holds (e.g. per-batch latents), its gradient scaled to the run's loss: this
    rank's backward yields N times that (see the module's docstring) and no averaging over ranks divides it."""
    if spans_ranks() and tensor.requires_grad:
        ranks = world_size()
        tensor.register_hook(lambda gradient: gradient / ranks)
    return tensor


def host_floats_summed(values: list[float], device: torch.device) -> list[float]:
    """Numbers from every rank added up, read back on every rank."""
    if not spans_ranks():
        return values
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def broadcast_from_main(value):
    """Rank 0's value (any picklable object) on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value) -> list | None:
    """Every rank's value (picklable, tensors on the host), as a list on rank 0; None elsewhere."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


@contextmanager
def on_main_only(context) -> Iterator[None]:
    """Enter ``context`` (e.g. the run folder's lock) on rank 0 alone; a DfadError it raises is raised on every rank,
    so the ranks stop together rather than wait for a rank that left."""
    if not is_distributed():
        with context:
            yield
        return
    with ExitStack() as stack:
        refusal = None
        if is_main():
            try:
                stack.enter_context(context)
            except DfadError as exc:
                refusal = exc.user_message()
        refusal = broadcast_from_main(refusal)
        if refusal:
            raise DfadError(refusal)
        yield


def refuse_another_world_size(saved: int, path) -> None:
    ranks = world_size()
    if saved != ranks:
        how = "as one process, without torchrun" if saved == 1 else f"with torchrun, {saved} processes in all"
        raise DfadError(f"{path} was written by a run of {saved} rank(s) and this one has {ranks}: resume it {how} "
                        "(each rank's share of the batch, random numbers and pool are its own)")


# --- models ----------------------------------------------------------------------------------------------------------
class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """PyTorch's SyncBatchNorm runs on GPUs only (DDP refuses it in a CPU module); this is the same normalisation for
    CPU tensors (the gloo backend): the per-channel sums of every rank added by a differentiable all-reduce, the
    running statistics updated from the whole batch's (the variance unbiased with the whole batch's count).

    It is mixed into the layer's own class (see sync_batchnorm), so a layer that does more than normalise keeps doing
    it: timm's BatchNormAct2d applies its ``drop`` and ``act`` after the normalisation, here too."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and spans_ranks()):
            return super().forward(input)  # the layer's own class: nothing to synchronise
        values = input.float()
        dims = [0, *range(2, values.dim())]
        shape = (1, -1) + (1,) * (values.dim() - 2)
        count = values.numel() // values.shape[1] * world_size()
        mean = sum_over_ranks(values.sum(dims)) / count
        centred = values - mean.view(shape)
        variance = sum_over_ranks(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach() * count / max(count - 1, 1))
        normalised = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        normalised = normalised.to(input.dtype)
        for after in ("drop", "act"):  # timm's norm-act layers
            if isinstance(getattr(self, after, None), nn.Module):
                normalised = getattr(self, after)(normalised)
        return normalised

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_variance, factor)


_CPU_SYNC_CLASSES: dict[type, type] = {}


def _cpu_sync_class(layer_class: type) -> type:
    """``layer_class`` with CpuSyncBatchNorm's forward in training across ranks, its own otherwise."""
    if layer_class not in _CPU_SYNC_CLASSES:
        _CPU_SYNC_CLASSES[layer_class] = type(f"CpuSync{layer_class.__name__}", (CpuSyncBatchNorm, layer_class), {})
    return _CPU_SYNC_CLASSES[layer_class]


def _has_timm_norm_act(module: nn.Module) -> bool:
    return any(type(layer).__module__.startswith("timm.") and hasattr(layer, "act")
               for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm))


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` (in place) normalising with the whole batch's statistics across ranks.
    timm's BatchNormAct2d (BatchNorm, dropout and activation in one layer) keeps its activation: on CUDA through
    timm's own conversion (PyTorch's would replace it by a plain SyncBatchNorm), on the CPU by the mixin above."""
    if not is_distributed():
        return module
    if device.type == "cuda":
        if _has_timm_norm_act(module):
            from timm.layers import convert_sync_batchnorm

            return convert_sync_batchnorm(module)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, CpuSyncBatchNorm):
            layer.__class__ = _cpu_sync_class(type(layer))  # the same state (weights, statistics), another forward
    return module


class DataParallel:
    """A module's forward under torchrun: DistributedDataParallel (weight gradients averaged over ranks) for the passes
    that train its weights; the module itself for the passes that do not (no gradient, or frozen weights: the student
    judging images for the generator), for which DDP would wait for weight gradients that never come."""

    def __init__(self, module: nn.Module, device: torch.device, compiled: bool):
        parallel = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        self.parameters = list(module.parameters())
        self.training_forward = torch.compile(parallel) if compiled else parallel
        self.plain_forward = torch.compile(module) if compiled else module

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        trains_weights = torch.is_grad_enabled() and any(parameter.requires_grad for parameter in self.parameters)
        return (self.training_forward if trains_weights else self.plain_forward)(*inputs)


def data_parallel(module: nn.Module, device: torch.device, compiled: bool = False) -> Callable[..., torch.Tensor]:
    """The forward to train ``module`` with: under torchrun its BatchNorm layers synchronised and DDP around it; in one
    process the module itself (compiled when asked)."""
    if not is_distributed():
        return torch.compile(module) if compiled else module
    return DataParallel(sync_batchnorm(module, device), device, compiled)


# --- data ------------------------------------------------------------------------------------------------------------
def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The training loader with each rank reading its own part of every epoch's shuffled order (DistributedSampler,
    which repeats a few samples so every rank gets as many batches; call shuffle_for_epoch before each epoch)."""
    if not is_distributed():
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      sampler=DistributedSampler(loader.dataset, shuffle=True, seed=seed))


def shuffle_for_epoch(loader: DataLoader, epoch: int) -> None:
    """A sharded loader's order for this epoch (the same on every rank, so their parts do not overlap)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
