"""The loop every distillation method shares: epochs or a time budget, checkpoints and exact resume, Ctrl-C/SIGTERM,
evaluation (observed only), collapse diagnostics and sample grids.

Run folder: config.json, metrics.jsonl, student.pt (the last epoch's: no labels choose it), generator.pt,
synthetic.pt (synthetic images for data-free INT8 calibration), last.pt (+ pool/ for pool methods),
samples/epoch_NNNN.png, result.json.

Under torchrun every rank runs this loop on its share of each batch (dfad_edge.distributed). Rank 0 alone writes the run
folder; last.pt also holds the other ranks' random-number and method states, and each keeps its part of a pool under
ranks/rankN/. Decisions that must not part the ranks (stop on a signal or a NaN, the time budget) are agreed on.
"""

from __future__ import annotations

import json
from dataclasses import replace
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from rich.markup import escape
from torch.utils._pytree import tree_map

from .. import __version__
from ..checkpoint import InputSpec, load_checkpoint, model_checkpoint, safe_torch_load
from ..data import check_compatible, make_loader, resolve_source
from ..data.unlabeled import refuse_evaluation_images
from ..distributed import (broadcast_from_main, data_parallel, gather_to_main, host_floats_summed, is_distributed,
                           is_main, local_main_first, local_rank, mean_over_ranks, on_main_only, rank, rank_device,
                           refuse_another_world_size, split_across_ranks, world_size)
from ..errors import DfadError
from ..evaluate import loader_accuracy
from ..io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, run_folder_lock
from ..models import build_kwargs, create_model
from ..models.frozen import CompiledInference, cast_if_it_agrees, fold_batchnorm
from ..progress import log, new_progress
from ..runtime import (autocast_dtype, cpu_bf16_instructions, peak_memory_mb, resolve_device, restore_rng_state, rng_state,
                       seed_everything)
from .config import BEFORE_STUDENT_INIT, DistillConfig, MethodOptions
from .diagnostics import collapse_diagnostics, collapse_warning
from .autocast_choice import FORMATS, choose_speed_settings
from .bn_recalibration import has_slow_batchnorm, recalibrate_batchnorm
from .method import DistillMethod, Setup, method_class
from .samples import save_sample_grid
from .student_init import initialise_from_teacher
from .weight_average import WeightAverage

STATE_FORMAT = "dfad-edge-distill-state/4"
SYNTHETIC_FORMAT = "dfad-edge-synthetic/1"
SYNTHETIC_IMAGES = 1024  # enough for INT8 calibration (512) and separate verification images
AUTOCAST_BATCH = 64  # the largest batch --amp auto times (its speed ratio changes little above)


class NonFiniteLoss(DfadError):
    """A NaN or inf in the losses, which every rank sees as their mean and stops at together."""

    every_rank_stops = True


class RunInterrupted(DfadError):
    """Raised after a clean save on Ctrl-C / SIGTERM."""

    every_rank_stops = True  # the ranks agree on a stop before any raises it: not one rank's failure


@contextmanager
def graceful_interrupts():
    """First Ctrl-C or SIGTERM sets a flag the loop checks between iterations (so state is saved whole);
    a second Ctrl-C aborts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, _frame):
        if requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.set()
        log("[yellow]stopping after this iteration and saving last.pt (Ctrl-C again to abort at once)[/]")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def load_synthetic_images(path: Path) -> tuple[torch.Tensor, InputSpec]:
    """synthetic.pt: normalised images a distillation made, and the spec they are in."""
    raw = safe_torch_load(path)
    if not isinstance(raw, dict) or raw.get("format") != SYNTHETIC_FORMAT:
        raise DfadError(f"{path} is not a dfad-edge synthetic-image file (written by dfad-edge distill)")
    return raw["images"].float(), InputSpec(**raw["input_spec"])


class Stopwatch:
    """Training time: wall time minus test-set evaluation (which only observes) and the writing of checkpoints."""

    def __init__(self, already: float = 0.0):
        self.started, self.already, self.excluded = time.perf_counter(), already, 0.0

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.started - self.excluded

    @contextmanager
    def excluding(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - started


class DistillRun:
    def __init__(self, config: DistillConfig, teacher_path: Path, out: Path, eval_data: str | None = None,
                 data_dir: Path | None = None, download: bool = False, resume: bool = False):
        self.out, self.resume, self.teacher_path = Path(out), resume, Path(teacher_path)
        self.last_path = self.out / "last.pt"
        # What a rank alone holds (its part of a pool) goes to its own folder; rank 0's is the run folder.
        self.rank_folder = self.out if is_main() else self.out / "ranks" / f"rank{rank()}"
        if self.last_path.exists() and not resume:
            raise DfadError(f"{self.out} already holds a run: pass --resume to continue it, or choose a new --out")
        # What --amp and channels_last asked for ("auto" is written to config.json, so --config measures afresh on
        # another machine) and how auto was decided.
        self.requested_amp = ({"amp": config.amp, "teacher_amp": config.teacher_amp, "channels_last": config.channels_last}
                              if config is not None else None)
        self.amp_choice = None
        if resume:
            if not self.last_path.exists():
                raise DfadError(f"--resume: no {self.last_path} to resume from")
            saved = self._read_state()
            refuse_another_world_size(saved.get("world_size", 1), self.last_path)
            # The saved config wins: a resumed run must be the same run.
            # A run begun before recalibrate_bn or student_init existed goes on as it began.
            config = DistillConfig.from_dict({"recalibrate_bn": "off", **BEFORE_STUDENT_INIT, **saved["config"]})
            self.requested_amp, self.amp_choice = saved["amp_requested"], saved["amp_choice"]
        config.validate()
        method_options = split_across_ranks(config.options)
        self.device = rank_device(resolve_device(config.device))
        self.teacher_checkpoint = load_checkpoint(self.teacher_path)
        if "auto" in (config.amp, config.channels_last):  # decided once; last.pt keeps the decision (same run)
            config = self._decide_speed_settings(config, getattr(method_options, "batch_size", AUTOCAST_BATCH))
        self.config = config
        self.amp_dtype = autocast_dtype(self.device, config.amp)
        self.teacher_amp_dtype = (self.amp_dtype if config.teacher_amp == "same"
                                  else autocast_dtype(self.device, config.teacher_amp))
        with local_main_first():  # one rank per machine downloads; the others then find the files
            self.eval_source = resolve_source(eval_data, data_dir, download and local_rank() == 0) if eval_data else None
        self.eval_data, self.data_dir = eval_data, data_dir
        if self.eval_source is not None:
            check_compatible(self.eval_source, self.teacher_checkpoint.input_spec,
                             self.teacher_checkpoint.num_classes, self.teacher_checkpoint.class_names)
        seed_everything(config.seed)
        self.student_spec = self._student_spec()
        self.setup = self._build_setup()
        self.average = (WeightAverage(self.student, config.average_epochs, config.iters_per_epoch)
                        if config.average_epochs > 0 else None)
        self.method: DistillMethod = method_class(config.method)(self.setup,
                                                                 self._options_at_student_rate(method_options))
        self._refuse_evaluation_sources()
        if is_distributed():
            # Every rank built the same networks from the run's seed (DDP requires it); each now draws its own numbers.
            seed_everything(self.rank_seeds()[rank()])

    def _options_at_student_rate(self, options: MethodOptions) -> MethodOptions:
        """The method's options with lr_student scaled by lr_scale_from_teacher where the student starts from the
        teacher's layers: the rate that trains a network from scratch throws copied layers away (docs/results.md,
        "The student's learning rate"). The config keeps the method's rate, so a resumed run scales it once again,
        not twice; the rate used goes into the student_init record."""
        if self.student_init["from"] != "teacher":
            return options
        rate = options.lr_student * self.config.lr_scale_from_teacher
        self.student_init["lr_student"] = rate
        log(f"student starts from the teacher's layers (blocks per stage: {self.student_init['blocks']}), "
            f"lr_student {options.lr_student:g} x {self.config.lr_scale_from_teacher:g} = {rate:g}")
        return replace(options, lr_student=rate)

    def _decide_speed_settings(self, config: DistillConfig, batch_size: int) -> DistillConfig:
        """``amp`` and ``channels_last`` "auto" made concrete by timing this run's teacher and student (rank 0 measures,
        every rank follows)."""
        decision = None
        if is_main():
            teacher_spec = self.teacher_checkpoint.input_spec
            spec = replace(teacher_spec, height=self._student_size(config)[0], width=self._student_size(config)[1])
            teacher = self.teacher_checkpoint.build_model().to(self.device).eval().requires_grad_(False)
            student = create_model(config.student_arch, **build_kwargs(
                config.student_arch, self.teacher_checkpoint.num_classes, spec.shape[0], spec.shape[1:])).to(self.device)
            batch = min(batch_size, AUTOCAST_BATCH)
            # Their own generator: deciding must not move the run's random stream.
            noise = torch.Generator().manual_seed(0)
            images = tuple(torch.randn(batch, *shape, generator=noise).to(self.device)
                           for shape in (teacher_spec.shape, spec.shape))
            workload = {"teacher": self.teacher_checkpoint.arch, "student": config.student_arch,
                        "teacher_input": list(teacher_spec.shape), "input": list(spec.shape), "batch": batch}
            decision = choose_speed_settings(teacher, student, images, workload, config.amp, config.teacher_amp,
                                             config.channels_last)
            del teacher, student
        amp, teacher_amp, channels_last, self.amp_choice = broadcast_from_main(decision)
        teacher_amp = teacher_amp if config.teacher_amp == "same" else config.teacher_amp  # asked for: kept
        choice = self.amp_choice
        log(f"--amp {config.amp}, channels_last {config.channels_last}: student {choice['chosen']}, teacher "
            f"{choice['teacher']}, {FORMATS[choice['channels_last']]} "
            f"({choice.get('ms_per_step') or choice['why']}{', cached' if 'cached' in choice else ''})")
        return replace(config, amp=amp, teacher_amp=teacher_amp, channels_last=channels_last)

    def _refuse_evaluation_sources(self) -> None:
        """Images the method learns from must not be the test set it is evaluated on."""
        records = self.method.provenance().get("source_images")
        if not records or self.eval_source is None:
            return
        evaluation = self.eval_source.dataset("test")
        files = [path for path, _label in getattr(evaluation, "samples", [])]
        refuse_evaluation_images(records, files, self.eval_data)

    def rank_seeds(self) -> list[int]:
        return [self.config.seed + index for index in range(world_size())]

    # --- set-up -----------------------------------------------------------------------------------------------
    def _student_spec(self) -> InputSpec:
        """The teacher's spec (normalisation, evaluation transform) at the student's input size."""
        height, width = self._student_size(self.config)
        return replace(self.teacher_checkpoint.input_spec, height=height, width=width)

    def _student_size(self, config: DistillConfig) -> tuple[int, int]:
        """The teacher's input size unless student_input_size asks for another: a student at its architecture's
        design size instead would see every image resized (a 16 px teacher's student at 8 px, a 96 px teacher's at
        224 px with 5x the MACs)."""
        if config.student_input_size:
            return tuple(config.student_input_size)
        return self.teacher_checkpoint.input_spec.height, self.teacher_checkpoint.input_spec.width

    def _build_setup(self) -> Setup:
        config, teacher_ckpt = self.config, self.teacher_checkpoint
        channels, height, width = self.student_spec.shape
        self.num_classes = teacher_ckpt.num_classes
        self.student_kwargs = build_kwargs(config.student_arch, self.num_classes, channels, (height, width))
        # Frozen and always in eval mode: synthetic batches must never overwrite its BatchNorm statistics.
        teacher = teacher_ckpt.build_model().to(self.device).eval().requires_grad_(False)
        self.student = create_model(config.student_arch, **self.student_kwargs).to(self.device)
        self.student_init = initialise_from_teacher(self.student, teacher, config.student_init)
        self.recalibrates_bn = config.recalibrate_bn == "on" or (config.recalibrate_bn == "auto"
                                                                 and has_slow_batchnorm(self.student))
        channels_last = config.channels_last == "on"  # made concrete by then (auto is decided first)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        teacher_size = (teacher_ckpt.input_spec.height, teacher_ckpt.input_spec.width)
        teacher_forward = torch.compile(teacher) if config.compile else teacher
        folded = self._build_inference_teacher(teacher, teacher_size)
        if config.compile:
            folded_forward = teacher_forward if folded is teacher else torch.compile(folded)
        elif config.compile_teacher and folded is not teacher:  # never freeze the original: BN-statistics hooks it
            folded_forward = CompiledInference(folded, self._teacher_compile_failed)
        else:
            folded_forward = folded
        self.inference_teacher["compiled"] = config.compile or isinstance(folded_forward, CompiledInference)
        return Setup(
            teacher=teacher, student=self.student,
            student_forward=data_parallel(self.student, self.device, config.compile),
            teacher_forward=teacher_forward, folded_teacher_forward=folded_forward, folded_teacher=folded,
            device=self.device, amp_dtype=self.amp_dtype, teacher_amp_dtype=self.teacher_amp_dtype,
            channels_last=channels_last,
            num_classes=self.num_classes, student_spec=self.student_spec,
            teacher_size=teacher_size if teacher_size != (height, width) else None, epochs=config.epochs)

    def _build_inference_teacher(self, teacher: nn.Module, size: tuple[int, int]) -> nn.Module:
        """The teacher with BatchNorm folded into its convolutions and their weights in its autocast type, for every
        forward that BN-statistics hooks do not watch (Setup.teacher_logits runs it under autocast); folding is checked
        against the teacher on a random batch (the original is used where folding is impossible)."""
        channels = self.teacher_checkpoint.input_spec.shape[0]
        # Its own generator: the check must not move the run's random stream (same seed, same run, folded or not).
        example = torch.randn(8, channels, *size, generator=torch.Generator().manual_seed(0)).to(self.device)
        folded = fold_batchnorm(teacher, example)
        self.inference_teacher = {"batchnorm_layers_folded": folded.layers, "not_folded_because": folded.reason or None}
        if folded.layers == 0:
            return teacher  # not copied: casting its weights would change what the hooked forwards compute
        if self.config.channels_last == "on":
            folded.module.to(memory_format=torch.channels_last)
        if self.teacher_amp_dtype is None:
            return folded.module
        inference = cast_if_it_agrees(teacher, folded.module, example, self.teacher_amp_dtype)
        self.inference_teacher["weights_in_autocast_type"] = inference is not folded.module
        return inference

    def _teacher_compile_failed(self, reason: str) -> None:
        log(f"[yellow]compiling the teacher failed ({escape(reason)}): it runs eager[/] "
            "(--set compile_teacher=false skips the attempt)")

    # --- evaluation and artifacts ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, spec: InputSpec, description: str) -> dict[str, float]:
        loader = make_loader(self.eval_source, "test", spec, batch_size=256)
        accuracy = loader_accuracy(model, loader, self.device, description)
        model.train(model is self.student)
        return accuracy

    @property
    def shipped_student(self) -> nn.Module:
        """What student.pt holds: the weight average where average_epochs is on, else the student as trained."""
        return self.average.model if self.average is not None else self.student

    def save_student(self, epoch: int) -> None:
        """The shipped student, this epoch's: written every epoch (it is small), so a stopped run ships its last epoch.
        Nothing here depends on evaluation: a run with and without --eval-data writes the same file."""
        model_checkpoint(self.shipped_student, self.config.student_arch, self.student_kwargs, self.num_classes, self.student_spec,
                         self.teacher_checkpoint.class_names, "distill", teacher=str(self.teacher_path), epoch=epoch,
                         method=self.config.method, preset=self.config.preset).save(self.out / "student.pt")

    def save_artifacts(self, epoch: int, calibration_images: torch.Tensor) -> None:
        """The generator and synthetic images for data-free calibration, at each checkpoint."""
        common = {"input_spec": vars(self.student_spec), "teacher": str(self.teacher_path), "epoch": epoch,
                  "dfad_edge_version": __version__}
        generator = self.method.generator_artifact()
        if generator is not None:
            atomic_torch_save({**generator, **common}, self.out / "generator.pt")
        atomic_torch_save({"format": SYNTHETIC_FORMAT, "images": calibration_images.detach().cpu().half(),
                           "method": self.config.method,
                           **common}, self.out / "synthetic.pt")

    # --- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_due(self, seconds: float) -> bool:
        """Once ``checkpoint_minutes`` of training passed since the last checkpoint (the run's final epoch and a stop
        write one regardless, in _run): at 224 px a checkpoint is gigabytes (DFAD's replay memory, the pool), too much
        to write every epoch. ``seconds`` is rank 0's clock as every rank agreed on it, so the ranks decide alike."""
        return seconds - self.last_checkpoint_s >= 60 * self.config.checkpoint_minutes

    def budget_spent(self, seconds: float) -> bool:
        """With a budget, whether ``seconds`` of training used it up. It can happen before the planned epochs end:
        each epoch runs at least one iteration, so a model whose iteration outlasts an epoch's share would otherwise
        run for hours past it."""
        budget = self.config.budget_minutes
        return budget is not None and seconds >= 60 * budget

    def _say_budget_spent_early(self, epoch: int) -> None:
        log(f"[yellow]the {self.config.budget_minutes:g}-minute budget is spent after epoch {epoch + 1} of "
            f"{self.config.epochs} (an iteration takes longer than an epoch's share): the run ends here[/] "
            "(--set epochs=N with fewer epochs gives each a longer share)")

    def save_checkpoint(self, epoch: int, iteration: int, accumulators: dict, epoch_start: dict, seconds: float) -> None:
        """generator.pt, synthetic.pt and last.pt (with the method's own files), outside the time budget."""
        elapsed = self.stopwatch.seconds  # the training time up to here; what follows is not training
        with self.stopwatch.excluding():
            # On every rank: a method may synchronise BatchNorm layers across ranks while it makes these.
            calibration_images = self.method.calibration_images(SYNTHETIC_IMAGES, seed=self.config.seed + 2)
            if is_main():
                self.save_artifacts(epoch, calibration_images)
            self.save_state(epoch, iteration, accumulators, epoch_start, elapsed)
        self.last_checkpoint_s = seconds

    def save_state(self, epoch: int, iteration: int, accumulators: dict, epoch_start: dict, elapsed: float) -> None:
        """Rank 0's state, and what differs on the other ranks gathered into last.pt: their random numbers and the part
        of the method's state each rank has for itself (e.g. DFAD's replay memory); the ranks' losses so far as their
        mean. ``elapsed``: the training time up to the checkpoint."""
        self.method.save_files(self.rank_folder)
        own = {"rng": rng_state(self.device), "method": self.method.state_dict()}
        local = {"rng": own["rng"], "method": {key: own["method"][key] for key in self.method.rank_local_state}}
        ranks = gather_to_main(None if is_main() else tree_map(lambda v: v.cpu() if torch.is_tensor(v) else v, local))
        losses = self._mean_losses(accumulators)
        if not is_main():
            return
        atomic_torch_save({
            "format": STATE_FORMAT, "config": self.config.to_dict(), "epoch": epoch, "iteration": iteration,
            "amp_requested": self.requested_amp, "amp_choice": self.amp_choice,
            "world_size": world_size(), "student": self.student.state_dict(), "method": own["method"],
            "average": self.average.state_dict() if self.average is not None else None,
            "rng": own["rng"], "other_ranks": ranks[1:],
            "accumulators": {**{k: v for k, v in accumulators.items() if not torch.is_tensor(v)}, **losses},
            "epoch_start": epoch_start, "teacher_accuracy": self.teacher_accuracy, "elapsed_s": elapsed,
        }, self.last_path)

    def _read_state(self) -> dict:
        state = safe_torch_load(self.last_path)
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != STATE_FORMAT:
            raise DfadError(f"{self.last_path} is not a dfad-edge distillation state of this version "
                            f"(format {found}, expected {STATE_FORMAT}): start a new run with another --out")
        return state

    def load_state(self) -> tuple[int, int, dict, dict]:
        state = self._read_state()
        own = state if is_main() else state["other_ranks"][rank() - 1]
        self.student.load_state_dict(state["student"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.method.load_state_dict({**state["method"], **own["method"]}, self.rank_folder)
        restore_rng_state(own["rng"], self.device)
        self.teacher_accuracy = state["teacher_accuracy"]
        self.stopwatch = Stopwatch(state["elapsed_s"])
        if is_main():
            self._drop_metrics_after(state["epoch"])
        accumulators = {k: v if k == "images" else torch.tensor(v, device=self.device)
                        for k, v in state["accumulators"].items()}
        return state["epoch"], state["iteration"], accumulators, state["epoch_start"]

    def _drop_metrics_after(self, epoch: int) -> None:
        """A hard kill between writing an epoch's metrics and its checkpoint would otherwise log that epoch twice."""
        metrics = self.out / "metrics.jsonl"
        if not metrics.exists():
            return
        kept = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    # --- the schedule ----------------------------------------------------------------------------------------
    def progress(self, epoch: int, iteration: int, seconds: float) -> float:
        """How far through the run this is, 0..1: by iterations, or by training time against the budget."""
        config = self.config
        if config.budget_minutes is not None:
            return min(1.0, seconds / (60 * config.budget_minutes))
        return (epoch * config.iters_per_epoch + iteration) / (config.epochs * config.iters_per_epoch)

    def epoch_done(self, epoch: int, iteration: int, seconds: float) -> bool:
        config = self.config
        if config.budget_minutes is not None:
            # At least one iteration, even if end-of-epoch work (evaluation excluded) ate into this epoch's share.
            return iteration > 0 and seconds >= 60 * config.budget_minutes * (epoch + 1) / config.epochs
        return iteration >= config.iters_per_epoch

    # --- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        with on_main_only(run_folder_lock(self.out)):
            return self._run()

    def _start(self) -> tuple[int, int, dict, dict]:
        self.teacher_accuracy, self.stopwatch = None, Stopwatch()
        if self.resume:
            epoch, iteration, accumulators, epoch_start = self.load_state()
            self.last_checkpoint_s = self.stopwatch.seconds
            log(f"resuming {self.out} at epoch {epoch + 1}, iteration {iteration}")
            return epoch, iteration, accumulators, epoch_start
        self.last_checkpoint_s = 0.0
        if not is_main():  # the metrics file and the teacher's accuracy are rank 0's
            return 0, 0, {}, {}
        (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.eval_source is not None:
            with self.stopwatch.excluding():
                self.teacher_accuracy = self.evaluate(self.setup.teacher, self.teacher_checkpoint.input_spec,
                                                      "  teacher eval")
            log(f"teacher top-1 on {self.eval_data}: {self.teacher_accuracy['100%']:.2%}")
        return 0, 0, {}, {}

    def _write_config(self) -> None:
        atomic_write_json(self.out / "config.json", {
            **self.config.to_dict(), **self.requested_amp, "teacher": str(Path(self.teacher_path).resolve()), "eval_data": self.eval_data,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "resolved": {"device": str(self.device), "amp_dtype": str(self.amp_dtype),
                         "teacher_amp_dtype": str(self.teacher_amp_dtype), "amp_choice": self.amp_choice,
                         "channels_last": self.setup.channels_last, "recalibrate_bn": self.recalibrates_bn,
                         "cpu_bf16_instructions": cpu_bf16_instructions() if self.device.type == "cpu" else None,
                         "student_input": list(self.student_spec.shape), "student_init": self.student_init,
                         "dfad_edge_version": __version__,
                         "world_size": world_size(), "rank_seeds": self.rank_seeds(),
                         "inference_teacher": self.inference_teacher, **self.method.provenance()}})

    def _run(self) -> dict:
        config = self.config
        epoch, iteration, accumulators, epoch_start = self._start()
        if is_main():
            self._write_config()
        with graceful_interrupts() as stop_requested, new_progress() as progress_bar:
            total = config.epochs if config.budget_minutes is not None else config.epochs * config.iters_per_epoch
            task = progress_bar.add_task("distill", total=total, status="",
                                         completed=epoch if config.budget_minutes is not None else
                                         epoch * config.iters_per_epoch + iteration)
            # A resumed run whose budget was spent before its planned epochs (budget_spent) is over.
            spent = self.budget_spent(self.stopwatch.seconds)
            while epoch < config.epochs and not spent:
                epoch_start = epoch_start or {"elapsed_s": self.stopwatch.seconds}
                while True:
                    # Asked before every iteration, the first of an epoch included: a stop requested while the last
                    # epoch ended (evaluation, checkpoints) ends the run there, without one more iteration.
                    seconds, stop = self._agree(stop_requested)
                    if stop:
                        self.save_checkpoint(epoch, iteration, accumulators, epoch_start, seconds)
                        raise RunInterrupted(f"interrupted at epoch {epoch + 1}, iteration {iteration}; state saved to "
                                             f"{self.last_path}. Continue with: {self._resume_command()}")
                    if self.epoch_done(epoch, iteration, seconds):
                        break
                    terms = self.method.iteration(self.progress(epoch, iteration, seconds))
                    if self.average is not None:
                        self.average.update()
                    if iteration == 0:
                        epoch_start.update(self.method.learning_rates())  # the rates this epoch trained with
                    iteration += 1
                    for key, value in terms.items():
                        accumulators[key] = accumulators.get(key, 0.0) + (value.float() if torch.is_tensor(value) else value)
                    if iteration % config.log_every == 0:
                        losses = self._mean_losses(accumulators)
                        self._check_finite(losses, epoch, iteration)
                        progress_bar.update(task, status=self._status(losses, iteration))
                    if config.budget_minutes is None:
                        progress_bar.advance(task)
                losses = self._mean_losses(accumulators)
                self._check_finite(losses, epoch, iteration)
                final = epoch + 1 >= config.epochs
                if not final and self.budget_spent(seconds):
                    final = True
                    self._say_budget_spent_early(epoch)
                self.end_epoch(epoch + 1, iteration, losses, accumulators.get("images", 0), epoch_start, final)
                epoch, iteration, accumulators, epoch_start = epoch + 1, 0, {}, {}
                if final or self.checkpoint_due(seconds):
                    self.save_checkpoint(epoch, iteration, accumulators, epoch_start, seconds)
                if final:
                    break
                if config.budget_minutes is not None:
                    progress_bar.advance(task)
        return broadcast_from_main(self._write_result(epoch) if is_main() else None)

    def _resume_command(self) -> str:
        if world_size() == 1:
            return f"dfad-edge distill --out {self.out} --resume"
        return f"torchrun [{world_size()} processes in all] -m dfad_edge distill --out {self.out} --resume"

    def _agree(self, stop_requested: threading.Event) -> tuple[float, bool]:
        """Training time and whether to stop, the same on every rank: rank 0's clock (the schedule and the time budget
        must not part the ranks) and a stop any rank was asked for (a signal may reach one rank only). Distributed, one
        small all-reduce and host synchronisation per iteration; in one process, nothing."""
        seconds, stops = host_floats_summed([self.stopwatch.seconds if is_main() else 0.0,
                                             float(stop_requested.is_set())], self.device)
        return seconds, stops > 0

    def _mean_losses(self, accumulators: dict) -> dict[str, float]:
        """The loss sums averaged over the ranks (each rank's losses are means over an equal share of the batch, so this
        is the whole batch's), read back in one transfer: the loop's host synchronisation, once per log interval."""
        losses = {k: v for k, v in accumulators.items() if torch.is_tensor(v)}
        if not losses:
            return {}
        return dict(zip(losses, mean_over_ranks(torch.stack(list(losses.values()))).tolist()))

    def _check_finite(self, losses: dict[str, float], epoch: int, iteration: int) -> None:
        """Every rank sees the same mean losses, so a NaN on any rank stops them all."""
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch + 1}, by iteration {iteration} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                f"the last good checkpoint {self.last_path} is kept. Lower the learning rates (--set) or use --amp off.")

    def _status(self, losses: dict[str, float], iteration: int) -> str:
        student = losses.get("loss_student", 0.0) / iteration
        return f"student loss {student:.3f}"

    def end_epoch(self, epoch: int, iterations: int, losses: dict[str, float], images_seen: int,
                  epoch_start: dict, final: bool = False) -> None:
        """``losses``: the epoch's loss sums (mean over ranks); ``images_seen``: this rank's count (every rank's equal)."""
        config = self.config
        seconds = self.stopwatch.seconds - epoch_start["elapsed_s"]
        record = {"epoch": epoch, "iterations": iterations,
                  **{k: round(v / max(iterations, 1), 5) for k, v in losses.items()},
                  **{k: v for k, v in epoch_start.items() if k.startswith("lr_")},
                  "images_per_s": round(images_seen * world_size() / max(seconds, 1e-9), 1),
                  "elapsed_s": round(self.stopwatch.seconds, 1), "peak_memory_mb": peak_memory_mb(self.device)}
        if self.average is not None:
            self.average.epoch_ended(iterations)
        if self.recalibrates_bn:  # on every rank: synchronised BatchNorm layers add the ranks' statistics
            self._recalibrate_student()
        # On every rank: a method may synchronise BatchNorm layers across ranks while it makes these (DFAD's generator).
        images, teacher_logits = self.method.synthetic_batch(config.diagnostic_images, seed=config.seed + 1)
        if not is_main():
            return
        diagnostics = collapse_diagnostics(images, teacher_logits, self.num_classes)
        record["collapse"] = {**diagnostics, **self.method.diagnostics()}
        record["synthetic_agreement"] = self._student_agreement(images, teacher_logits)
        warning = collapse_warning(diagnostics, self.num_classes)
        if warning:
            record["warning"] = warning
            log(f"[yellow]epoch {epoch}: {warning}[/]")
        with self.stopwatch.excluding():
            self._save_samples(epoch, images, teacher_logits)
            self.save_student(epoch)
        if self.eval_source is not None and (epoch % config.eval_every == 0 or final):
            with self.stopwatch.excluding():
                record["accuracy"] = self.evaluate(self.shipped_student, self.student_spec, "  eval")
                if self.average is not None:  # observed only: what the average adds
                    record["accuracy_unaveraged"] = self.evaluate(self.student, self.student_spec, "  eval unaveraged")
        log(f"epoch {epoch}: " + (f"student {record['accuracy']['100%']:.2%}, " if "accuracy" in record else "")
            + (f"unaveraged {record['accuracy_unaveraged']['100%']:.2%}, " if "accuracy_unaveraged" in record else "")
            + f"student loss {record.get('loss_student', 0):.4f}, classes {diagnostics['classes_predicted']}/"
            f"{self.num_classes}, entropy {diagnostics['class_entropy']:.2f}, diversity {diagnostics['image_diversity']:.2f}")
        append_jsonl(self.out / "metrics.jsonl", record)

    def _recalibrate_student(self) -> None:
        """The running statistics every saved and evaluated student carries: computed on the method's images now,
        not averaged over weights long gone (see bn_recalibration). Counted in training time: it makes the student.
        The images are drawn as synthetic.pt's (not the diagnostic images, which would then flatter the agreement).
        With a weight average, the student as trained too: its accuracy_unaveraged must not read stale statistics."""
        images = self.method.calibration_images(self.config.diagnostic_images, seed=self.config.seed + 2)
        students = [self.student] + ([self.average.model] if self.average is not None else [])
        for student in students:
            recalibrate_batchnorm(student, images, self._student_forward_under_autocast(student),
                                  self.method.student_batch_size)

    def _student_forward_under_autocast(self, student: nn.Module):
        def forward(batch: torch.Tensor) -> None:
            with self.setup.autocast():
                student(self.setup.to_memory_format(batch))

        return forward

    @torch.no_grad()
    def _student_agreement(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> float:
        """Top-1 agreement of student and teacher on the diagnostic synthetic images: a data-free progress signal."""
        student = self.shipped_student
        was_training = student.training
        student.eval()
        with self.setup.autocast():
            predicted = torch.cat([student(self.setup.to_memory_format(images[i:i + 256])).argmax(1)
                                   for i in range(0, len(images), 256)])
        student.train(was_training)
        return round(float((predicted == teacher_logits.argmax(1)).float().mean()), 4)

    def _save_samples(self, epoch: int, images: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        count = min(self.config.sample_images, len(images))
        names = self.teacher_checkpoint.class_names
        labels = [names[p] if names else str(p) for p in teacher_logits[:count].argmax(1).tolist()]
        save_sample_grid(images[:count], self.student_spec.mean, self.student_spec.std, labels,
                         self.out / "samples" / f"epoch_{epoch:04d}.png")

    def _write_result(self, epochs_run: int) -> dict:
        metrics = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evaluated = [m for m in metrics if m.get("accuracy")]
        shipped = metrics[-1] if metrics else {}
        generator = self.out / "generator.pt"
        result = {"student": str(self.out / "student.pt"), "generator": str(generator) if generator.exists() else None,
                  "synthetic": str(self.out / "synthetic.pt"), "method": self.config.method, "preset": self.config.preset,
                  **self.method.provenance(),
                  "epochs_run": epochs_run, "epochs": self.config.epochs,
                  "shipped": {"epoch": shipped.get("epoch"), "selection": "the last epoch (no labels are used to choose)"
                              + (f", weights averaged over about {self.config.average_epochs:g} epochs"
                                 if self.average is not None else ""),
                              "test_accuracy": shipped.get("accuracy")},
                  "teacher_accuracy": self.teacher_accuracy, "train_seconds": round(self.stopwatch.seconds, 1)}
        if evaluated:
            best = max(evaluated, key=lambda m: m["accuracy"]["100%"])
            result["best_test_epoch"] = {"epoch": best["epoch"], "test_accuracy": best["accuracy"],
                                         "note": "chosen on test labels: for reference only, never shipped"}
        atomic_write_json(self.out / "result.json", result)
        return result
