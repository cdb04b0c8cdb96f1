"""Distillation configuration as data: the loop's options (shared by every method) and each method's own options,
each declared once with its help and valid range (dfad_edge.options), and presets as named instances.

``--method dfad --preset cifar100`` is the published DFAD recipe field by field. With no method or preset, the
default is the best configuration measured for the teacher's kind of data, chosen from its input size alone
(never from a data set's name): tiny images (<= 16 px), small (<= 64 px) or large.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import DfadError
from ..options import field_names, from_plain, option, option_help, parse_value, validate_options
from ..progress import log
from .dfad import DfadOptions
from .method import method_class
from .pool import PoolOptions
from .prior import PriorOptions
from .student_init import STUDENT_INITS

KINDS = ("tiny", "small", "large")
MethodOptions = DfadOptions | PoolOptions | PriorOptions
RUN_FACTS = ("teacher", "eval_data", "data_dir", "resolved")
# A run saved (last.pt) or described (config.json) before these options existed ran without them: it resumes, or is
# repeated, as it ran (a student from random weights; a copied one trained at the method's rate).
BEFORE_STUDENT_INIT = {"student_init": "random", "lr_scale_from_teacher": 1.0}
# channels_last was a boolean before it could be auto: run folders and --set spellings of that time still work.
BOOLEAN_CHANNELS_LAST = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}


@dataclass
class DistillConfig:
    """The loop's options; ``options`` holds the chosen method's."""

    method: str = option("pool", "distillation method", choices=("dfad", "pool", "prior"))
    preset: str = option("custom", "the named configuration this one started from")
    student_arch: str = option("resnet20", "student architecture (dfad-edge models)")
    student_input_size: tuple[int, ...] | None = option(None, "student HxW (default: the teacher's)", min=1)
    student_init: str = option("auto", "the student's first weights: teacher copies the teacher's layers into a "
                               "student of its family with fewer blocks per stage (evenly spaced blocks, as DistilBERT "
                               "does), random never does, auto does where the layers fit", choices=STUDENT_INITS)
    lr_scale_from_teacher: float = option(0.3, "factor on the method's lr_student (preset or --set) where the student "
                                          "starts from the teacher's layers: copied layers are fine-tuned, not "
                                          "trained from scratch (1 keeps the method's rate)", above=0, max=1)
    average_epochs: float = option(0.0, "ship an exponential moving average of the student's weights and BatchNorm "
                                   "statistics over about this many last epochs (0: the student as trained)", min=0)
    epochs: int = option(100, "epochs: evaluation, diagnostics and checkpoints happen at each epoch's end", min=1)
    iters_per_epoch: int = option(20, "method iterations per epoch (with a budget: as many as fit)", min=1)
    budget_minutes: float | None = option(None, "train for this long; the schedule is planned to end then", above=0)
    seed: int = option(0, "seed of every random number in the run", min=0)
    device: str = option("auto", "auto, cpu or cuda[:N]")
    amp: str = option("auto", "mixed precision of the student and generator: auto times fp32 against the hardware's "
                      "native type (bf16; fp16 on older GPUs) at start-up, for the student and the teacher apart, and "
                      "takes each one's faster (cached per machine and models)",
                      choices=("auto", "off", "bf16", "fp16"))
    teacher_amp: str = option("same", "precision of the teacher's folded forwards (the students' targets): same as "
                              "amp, or off, bf16, fp16; amp=auto times the teacher apart and sets it (unless given)",
                              choices=("same", "off", "bf16", "fp16"))
    channels_last: str = option("auto", "NHWC memory format (the tensor cores' and oneDNN's): on, off, or auto: the "
                                "faster, timed at start-up with --amp auto's measurement (cached per machine and models)",
                                choices=("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the student and teacher")
    compile_teacher: bool = option(True, "torch.compile the frozen teacher's forwards without gradients (a few seconds "
                                   "per input shape; pays off in runs of minutes)")
    checkpoint_minutes: float = option(5.0, "training minutes between writes of last.pt, generator.pt and synthetic.pt "
                                       "(at an epoch's end; the last epoch and a stop always write; 0: every epoch)",
                                       min=0)
    eval_every: int = option(1, "epochs between test-set evaluations (with --eval-data; observed only)", min=1)
    diagnostic_images: int = option(512, "synthetic images for the collapse diagnostics each epoch", min=2)
    recalibrate_bn: str = option("auto", "recompute the student's BatchNorm statistics on diagnostic_images of the "
                                 "method's calibration images before each save and evaluation; auto: where a layer's "
                                 "momentum is below 0.1 (MobileNetV3's 0.01 otherwise ships statistics that lag the "
                                 "weights)", choices=("auto", "on", "off"))
    sample_images: int = option(64, "images in each epoch's sample grid", min=1)
    log_every: int = option(10, "iterations between reading losses back to the host (NaN check, progress bar)", min=1)
    options: MethodOptions = field(default_factory=PoolOptions, metadata={"help": "the method's options"})

    def validate(self) -> None:
        self.channels_last = BOOLEAN_CHANNELS_LAST.get(str(self.channels_last).lower(), self.channels_last)
        validate_options(self)
        if self.student_input_size is not None:
            if len(self.student_input_size) == 1:
                self.student_input_size = self.student_input_size * 2  # one size: a square input
            if len(self.student_input_size) != 2:
                raise DfadError(f"student_input_size takes H,W (e.g. 32,32) or one size, got {self.student_input_size}")
        expected = method_class(self.method).options_class
        if not isinstance(self.options, expected):
            raise DfadError(f"method '{self.method}' takes {expected.__name__}, got {type(self.options).__name__}")
        validate_options(self.options, prefix=f"{self.method}.")
        self.options.validate(self.epochs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data[self.method] = data.pop("options")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DistillConfig":
        if "resolved" in data:
            data = {**BEFORE_STUDENT_INIT, **data}
        # A run's config.json also records facts about the run (teacher, eval data, what was resolved): not options.
        data = {key: value for key, value in data.items() if key not in RUN_FACTS}
        method = data.get("method", "pool")
        options = from_plain(method_class(method).options_class, data.pop(method, {}))
        known = {key: value for key, value in data.items() if key in field_names(cls) and key != "options"}
        unknown = set(data) - set(known) - {"options"}
        if unknown:
            raise DfadError(f"unknown distill option(s): {', '.join(sorted(unknown))}")
        return replace(from_plain(cls, {k: v for k, v in known.items()}), options=options)


def _dfad(**loop) -> DistillConfig:
    return DistillConfig(method="dfad", options=DfadOptions(), **{"epochs": 500, "iters_per_epoch": 50, **loop})


def _measured_pool(**changes) -> PoolOptions:
    """The pool method as measured best on a CPU (docs/results.md, "Choosing the default"): DFAD's generator and adversarial L1
    term, one generator step per batch, every batch and two forward-only batches from the generator kept in a pool,
    the student learning from it by KL at T = 20 with half of each batch from the newest images. Fast-DFKD's
    meta-learnt few-step synthesis, sigmoid generator, target-class cross-entropy and masked KL (PoolOptions' defaults)
    each measured worse within a 5-minute CIFAR-10 budget on 2 CPU cores."""
    return PoolOptions(**{"generator": "a", "meta": "none", "synth_steps": 1, "lr_generator": 1e-3,
                          "synth_augment": False, "ce": 0.0, "class_balance": 1.0, "bn_momentum": 0.0,
                          "adversarial_loss": "l1", "adversarial_start": 0.0, "batch_size": 128, "samples_per_step": 2,
                          "pool_size": 8192, "recent_fraction": 0.5, "student_batch": 128, "student_steps": 5,
                          "lr_student": 0.1, "weight_decay": 5e-4, "warmup": 0.0, "student_augment": False,
                          **changes})


def _large(config: DistillConfig) -> DistillConfig:
    """What every large-image preset shares. 20 epochs: at 224 px an epoch's end (diagnostics through the teacher, the
    student's file) costs seconds, so 100 epochs of a 30-minute budget would spend minutes there; 256 diagnostic images
    for the same reason. Memory at batch 64 and 224 px: docs/results.md ("Large images")."""
    return replace(config, student_arch="torchvision.mobilenet_v3_small", epochs=20, iters_per_epoch=20,
                   diagnostic_images=256)


# The tiny presets run for seconds (digits: ~30 s), where compiling the teacher (~3 s) costs more than it saves. Their
# 24 epochs (12 before) were chosen on CIFAR-10 at 16 px, a tiny-kind data set no preset was tuned on: +0.9 to 1.0
# points on each of 3 seeds (docs/results.md, "Choosing the default").
PRESETS: dict[str, dict[str, DistillConfig]] = {
    "dfad": {
        # The paper's recipe (Fang et al. 2019): ResNet-34 -> ResNet-18 on CIFAR-100, 500 epochs x 50 iterations, the
        # student from random weights as published.
        "cifar100": _dfad(preset="cifar100", student_arch="resnet18_8x", student_init="random"),
        "cifar10": _dfad(preset="cifar10", student_arch="resnet18_8x", student_init="random"),
        # dfad-edge's remedies against mode collapse, as measured on a 32x32 teacher (docs/results.md, CIFAR-10 on a CPU).
        # The generator's rate constant: 30 minutes on CIFAR-10, 74.73 / 75.03 / 75.39% against the scheduled rate's
        # 74.11 / 74.45 (74.83 rerun beside it) / 74.34% on seeds 0-2 (a screening on test labels; docs/results.md,
        # "A constant generator rate"). The teacher's stage outputs as targets (stage_match=auto: on for a student of
        # the teacher's stages): 30 minutes, CPU-B seeds 0-2 74.82 / 74.75 / 75.57% beside the default's 73.84% (seed
        # 0); CPU-A seeds 0 / 1 73.05 / 73.35% beside 71.82 / 70.50% (docs/results.md, "The teacher's stage
        # outputs"; screenings on test labels).
        "small": replace(_dfad(preset="small", epochs=26, iters_per_epoch=20),
                         options=DfadOptions(batch_size=64, scheduler="cosine", bn_stats=10.0, class_balance=1.0,
                                             replay_size=8192, generator_schedule="constant", stage_match="auto")),
        "tiny": replace(_dfad(preset="tiny", student_arch="digits_cnn_medium", epochs=24, iters_per_epoch=20,
                              compile_teacher=False),
                        options=DfadOptions(nz=64, ngf=32, batch_size=128, lr_student=0.05, milestones=(16, 22),
                                            bn_stats=1.0, class_balance=1.0, replay_size=4096)),
    },
    "pool": {
        "small": DistillConfig(preset="small", student_arch="resnet20", epochs=26, iters_per_epoch=20,
                               options=_measured_pool()),
        "tiny": DistillConfig(preset="tiny", student_arch="digits_cnn_medium", epochs=24, iters_per_epoch=20,
                              compile_teacher=False, options=_measured_pool(nz=64, ngf=32)),
        "large": _large(DistillConfig(preset="large", options=_measured_pool(batch_size=64, student_batch=64,
                                                                              pool_size=4096))),
    },
}
PRESETS["dfad"]["large"] = _large(replace(
    _dfad(preset="large"), options=DfadOptions(batch_size=64, scheduler="cosine", bn_stats=10.0, class_balance=1.0,
                                               replay_size=2048)))
PRESETS["prior"] = {
    "small": DistillConfig(method="prior", preset="small", student_arch="resnet20", epochs=26, iters_per_epoch=20,
                           options=PriorOptions()),
    "tiny": DistillConfig(method="prior", preset="tiny", student_arch="digits_cnn_medium", epochs=24, iters_per_epoch=20,
                          compile_teacher=False, options=PriorOptions(nz=64, ngf=32, batch_size=128, generator_fraction=0.5)),
    # No generator: at 224 px its step (through the teacher's BatchNorm layers, forward and backward) costs more than
    # the student's five, and the paper distils ImageNet teachers from crops alone.
    "large": _large(DistillConfig(method="prior", preset="large", options=PriorOptions(batch_size=64,
                                                                                       generator_fraction=0.0))),
}
# The method ``--method auto`` picks for each kind of data: the one that measured better at the same budget
# (docs/results.md, "Choosing the default"): on tiny images the image prior (digits 98.44% against 97.71%, CIFAR-10 at
# 16 px 53.5% against 48.5%, 3 seeds each), on small ones dfad (CIFAR-10, 30 minutes: 65.6% against 52.6%; both
# with the student from the teacher's layers at the method's rate, 5 minutes: 57.4% against 31.4%), on large
# ones the image prior (ResNet-18 teachers, 30 minutes: at 224 px 39.85% against the published DFAD recipe's 10.0%,
# which needs over 20 GB at its batch of 256; at 96 px 48.35% against 10.0%; docs/results.md, "Large images").
DEFAULT_METHOD = {"tiny": "prior", "small": "dfad", "large": "prior"}


def teacher_kind(input_height: int) -> str:
    """The kind of data a teacher was trained on, from its input size alone."""
    return "tiny" if input_height <= 16 else "small" if input_height <= 64 else "large"


def preset_config(method: str = "auto", preset: str = "auto", kind: str = "small") -> DistillConfig:
    """A copy of a named configuration; ``auto`` picks the method, and the method's preset, for the teacher's kind of
    data."""
    if method == "auto":
        method = DEFAULT_METHOD[kind]
    if method not in PRESETS:
        raise DfadError(f"unknown method '{method}': choose one of {', '.join(PRESETS)}")
    name = kind if preset == "auto" else preset
    if name not in PRESETS[method]:
        raise DfadError(f"unknown preset '{name}' for method {method}: choose one of {', '.join(PRESETS[method])}")
    base = PRESETS[method][name]
    return replace(base, options=replace(base.options))


def apply_overrides(config: DistillConfig, assignments: list[str]) -> DistillConfig:
    """``key=value`` overrides: a loop option (``epochs=10``) or the method's (``lr_student=0.1`` or
    ``pool.lr_student=0.1``). Unknown keys are refused with the list of valid ones."""
    loop_changes, method_changes = {}, {}
    method_cls = type(config.options)
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        key = key.strip()
        if not separator:
            raise DfadError(f"--set {assignment}: expected key=value, e.g. --set lr_student=0.1")
        scoped = key.startswith(f"{config.method}.")
        name = key.split(".", 1)[1] if scoped else key
        if not scoped and name in field_names(DistillConfig) - {"options", "method"}:
            loop_changes[name] = parse_value(DistillConfig, name, text.strip(), key)
        elif name in field_names(method_cls):
            method_changes[name] = parse_value(method_cls, name, text.strip(), key)
        else:
            valid = sorted(field_names(DistillConfig) - {"options", "method"}) + sorted(field_names(method_cls))
            raise DfadError(f"--set {key}: no such option for method {config.method}. Valid: {', '.join(valid)}")
    changed = replace(config, **loop_changes, options=replace(config.options, **method_changes))
    if "epochs" in loop_changes and "milestones" not in method_changes:
        changed = with_epochs(changed, changed.epochs, planned_for=config.epochs)
    return changed


def with_epochs(config: DistillConfig, epochs: int, planned_for: int) -> DistillConfig:
    """``config`` run for ``epochs`` instead of the ``planned_for`` its multistep milestones were set for: they move
    to the same shares of the run (a preset's drops at 2/3 and 11/12 of 24 epochs stay there at 12), with one line
    saying so; those that would fall on or past the last epoch are dropped."""
    milestones = getattr(config.options, "milestones", ())
    if getattr(config.options, "scheduler", None) != "multistep" or not milestones or epochs == planned_for:
        return replace(config, epochs=epochs)
    moved = tuple(m for m in sorted({max(1, round(m * epochs / planned_for)) for m in milestones}) if m < epochs)
    if moved != tuple(milestones):
        log(f"note: milestones {tuple(milestones)} were set for {planned_for} epochs; with epochs={epochs} they are "
            f"{moved or 'none (no drop)'} (--set milestones=... to choose)")
    return replace(config, epochs=epochs, options=replace(config.options, milestones=moved))


def options_reference() -> str:
    """Every option of the loop and of each method with its default, for --help."""
    lines = ["Loop options (--set key=value):"] + ["  " + line for line in option_help(DistillConfig)
                                                   if not line.startswith(("options=", "method=", "preset="))]
    for method in PRESETS:
        options_cls = method_class(method).options_class
        lines += ["", f"Method '{method}' (--set key=value or {method}.key=value):"]
        lines += ["  " + line for line in option_help(options_cls)]
    return "\n".join(lines)

