"""torchrun runs on the CPU (gloo backend, two processes): N ranks of batch B/N make the update one process of batch B
makes, rank 0 alone writes the run folder, and the ranks stop, and resume, together."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import dfad_edge.distill.pool as pool_module
from conftest import distill_config
from dfad_edge import distributed
from dfad_edge.checkpoint import load_checkpoint, safe_torch_load
from dfad_edge.distill import DistillRun, RunInterrupted, preset_config
from dfad_edge.distill.pool import balanced_targets
from dfad_edge.distributed import rank, split_across_ranks, torchrun_process_group
from dfad_edge.errors import DfadError
from dfad_edge.evaluate import evaluate_checkpoint
from dfad_edge.train_teacher import TeacherConfig, train_teacher
from test_distill import _metrics, _tiny, nan_from_epoch_2

RANKS = 2
BATCH = 32
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
            "-m", "dfad_edge"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_two_ranks(function, *args) -> None:
    """function(*args) in two fresh processes that join as torchrun's do (its environment variables; gloo)."""
    mp.start_processes(_as_rank, args=(_free_port(), function, args), nprocs=RANKS, start_method="spawn")


def _as_rank(rank_index: int, port: int, function, args) -> None:
    os.environ.update(RANK=str(rank_index), LOCAL_RANK=str(rank_index), WORLD_SIZE=str(RANKS),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DFAD_EDGE_QUIET="1")
    torch.set_num_threads(1)  # two ranks on two cores (torchrun sets OMP_NUM_THREADS=1 alike)
    with torchrun_process_group("cpu"):
        function(*args)


def _drawing(draws: list[torch.Tensor]):
    """A torch.randn that returns the given tensors in turn, checking the size asked for: both runs see the same
    latents, and a rank must ask for its share of the batch. ``randn.handed_out`` keeps what it returned."""
    pending = iter(draws)

    def randn(*size, **kwargs):
        drawn = next(pending)
        assert tuple(drawn.shape) == tuple(size), (drawn.shape, size)
        randn.handed_out.append(drawn.clone().to(kwargs.get("device") or "cpu"))
        return randn.handed_out[-1]

    randn.handed_out = []
    return randn


def _trained_state(run: DistillRun) -> dict:
    return {"student": {k: v.clone() for k, v in run.student.state_dict().items()},
            "generator": {k: v.clone() for k, v in run.method.generator.state_dict().items()}}


def _assert_same_update(reference: dict, shards: list[dict], before: dict, unmatched: set[str] = frozenset(),
                        atol: float = 1e-5) -> None:
    for part in ("student", "generator"):
        moved = max(float((reference[part][k].float() - before[part][k].float()).abs().max()) for k in before[part])
        assert moved > 1e-3, f"the {part} did not learn: the comparison would be of untouched copies"
        for key, expected in reference[part].items():
            for shard in shards if f"{part}.{key}" not in unmatched else ():
                torch.testing.assert_close(shard[part][key], expected, rtol=1e-4, atol=atol, msg=f"{part}.{key}")


# --- one step: N ranks of B/N update like one process of B ---------------------------------------------------------
def _dfad_step_config():
    # fp32 (bf16 rounding would hide a wrongly combined gradient), one layout for the reference and the ranks (each
    # would time its own batch), and no replay memory (its draws differ per rank).
    return distill_config("dfad", "tiny", amp="off", channels_last="off",
                          options={"batch_size": BATCH, "student_steps": 2, "replay_size": 0})


def _dfad_latents() -> list[torch.Tensor]:
    """One latent batch per student step and one for the generator step."""
    nz = _dfad_step_config().options.nz
    return list(torch.randn(3, BATCH, nz, generator=torch.Generator().manual_seed(7)))


def _dfad_step_on_rank(teacher, folder) -> None:
    run = DistillRun(_dfad_step_config(), teacher, folder / "run")
    share = slice(rank() * BATCH // RANKS, (rank() + 1) * BATCH // RANKS)
    torch.randn = _drawing([latents[share] for latents in _dfad_latents()])
    run.method.iteration(0.5)
    torch.save(_trained_state(run), folder / f"rank{rank()}.pt")


def test_a_dfad_step_on_two_ranks_of_half_the_batch_equals_one_process_of_the_whole(tmp_path, digits_teacher,
                                                                                       monkeypatch):
    reference = DistillRun(_dfad_step_config(), digits_teacher, tmp_path / "one")
    before = _trained_state(reference)
    with monkeypatch.context() as patches:
        patches.setattr(torch, "randn", _drawing(_dfad_latents()))
        reference.method.iteration(0.5)
    on_two_ranks(_dfad_step_on_rank, digits_teacher, tmp_path)
    shards = [torch.load(tmp_path / f"rank{index}.pt") for index in range(RANKS)]
    # Generator BatchNorm (synchronised), BN-statistics and class-balance terms over the whole batch, DDP averaging.
    _assert_same_update(_trained_state(reference), shards, before, GENERATOR_A_BIASES_BEFORE_BATCHNORM)


# A bias right before a BatchNorm has no gradient in exact arithmetic (the normalisation removes it): Adam scales its
# rounding noise up to steps of +-lr, different in any two runs, and with no effect on the images.
GENERATOR_A_BIASES_BEFORE_BATCHNORM = {"generator.block1.0.bias", "generator.block2.0.bias"}


def _pool_step_config():
    # Fast-DFKD's synthesis (meta-learnt generator, class targets, masked KL) with every whole-batch term on;
    # augmentation and extra sampled batches off, so nothing random is left but the latents and targets fed in.
    return distill_config("pool", "tiny", amp="off", channels_last="off", options={
        "generator": "pixels", "meta": "fomaml", "ce": 0.5, "adversarial_loss": "masked_kl", "samples_per_step": 0,
        "batch_size": BATCH, "student_batch": BATCH, "pool_size": 2 * BATCH, "student_steps": 1, "warmup": 0.0,
        "adversarial_start": 0.0, "diversity": 1.0, "class_balance": 1.0, "synth_augment": False, "flip": "off"})


def _pool_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Target classes (sample i and i + B/2 alike, as balanced_targets makes them) and latents."""
    generator = torch.Generator().manual_seed(7)
    first_half = torch.randperm(BATCH // 2, generator=generator) % 10
    return torch.cat([first_half, first_half]), torch.randn(BATCH, _pool_step_config().options.nz, generator=generator)


def _pool_share(rank_index: int) -> torch.Tensor:
    """A rank's rows of the batch: a slice of each half, so its pairs (i, i + share/2) are the batch's (i, i + B/2)."""
    quarter = BATCH // (2 * RANKS)
    first = torch.arange(rank_index * quarter, (rank_index + 1) * quarter)
    return torch.cat([first, first + BATCH // 2])


def _feed_pool_inputs(run: DistillRun, rows: torch.Tensor) -> None:
    targets, latents = _pool_inputs()
    pool_module.balanced_targets = lambda *args: targets[rows]
    torch.randn = _drawing([latents[rows]])
    # The student's batch: every image the rank synthesised (the whole batch over the ranks).
    run.method.pool.sample_indices = lambda size, *args: torch.arange(size)


def _pool_step_on_rank(teacher, folder) -> None:
    run = DistillRun(_pool_step_config(), teacher, folder / "run")
    _feed_pool_inputs(run, _pool_share(rank()))
    run.method.iteration(0.5)
    pool = run.method.pool
    torch.save({**_trained_state(run), "pool": pool.stored[:pool.filled].clone(),
                "latent_gradient": torch.randn.handed_out[0].grad}, folder / f"rank{rank()}.pt")


def test_a_pool_step_on_two_ranks_of_half_the_batch_equals_one_process_of_the_whole(tmp_path, digits_teacher,
                                                                                       monkeypatch):
    reference = DistillRun(_pool_step_config(), digits_teacher, tmp_path / "one")
    before = _trained_state(reference)
    with monkeypatch.context() as patches:
        targets, latents = _pool_inputs()
        randn = _drawing([latents])
        patches.setattr(pool_module, "balanced_targets", lambda *args: targets)
        patches.setattr(torch, "randn", randn)
        patches.setattr(reference.method.pool, "sample_indices", lambda size, *args: torch.arange(size))
        reference.method.iteration(0.5)
    on_two_ranks(_pool_step_on_rank, digits_teacher, tmp_path)
    shards = [torch.load(tmp_path / f"rank{index}.pt") for index in range(RANKS)]
    # Synchronised BatchNorm, whole-batch terms, averaged generator gradients and the per-rank latents' gradients.
    # Rounding differences (each rank sums its half in its own order) grow through the meta-learnt inner steps, whose
    # Adam-updated latents feed the first layer: its weights differ by up to 1.5e-5 (convolutions as written) or 2e-5
    # (upsampling as transposed convolutions), 50 times less than one step (lr 1e-3), which a wrong gradient would move.
    _assert_same_update(_trained_state(reference), shards, before, atol=5e-5)
    for index, shard in enumerate(shards):  # each rank's pool and latents: its rows of the batch
        rows = _pool_share(index)
        torch.testing.assert_close(shard["pool"].float(), reference.method.pool.stored[rows].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(shard["latent_gradient"], randn.handed_out[0].grad[rows], rtol=1e-4, atol=1e-7)


def _timm_student_step(folder) -> dict:
    """One training-mode forward and backward of a timm student (its BatchNormAct2d layers: BatchNorm and activation
    in one) on this rank's share of a fixed batch, as synchronised under torchrun; the outputs and gradients."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1).train()
    images = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    share = slice(rank() * BATCH // distributed.world_size(), (rank() + 1) * BATCH // distributed.world_size())
    distributed.sync_batchnorm(model, torch.device("cpu"))
    logits = model(images[share])
    logits.square().mean().backward()  # a per-sample mean: over equal shares, the ranks' mean is the batch's
    distributed.average_gradients(model.parameters())
    state = {"logits": logits.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    if folder is not None:
        torch.save(state, folder / f"timm-rank{rank()}.pt")
    return state


def test_a_timm_student_on_two_ranks_of_half_the_batch_computes_what_one_process_computes(tmp_path):
    pytest.importorskip("timm")
    whole = _timm_student_step(None)
    on_two_ranks(_timm_student_step, tmp_path)
    for index in range(RANKS):
        shard = torch.load(tmp_path / f"timm-rank{index}.pt", weights_only=True)
        share = slice(index * BATCH // RANKS, (index + 1) * BATCH // RANKS)
        # The activation after each synchronised BatchNorm is kept: a plain SyncBatchNorm in its place would not.
        torch.testing.assert_close(shard["logits"], whole["logits"][share], rtol=1e-3, atol=1e-4)
        for name, gradient in whole["grads"].items():
            torch.testing.assert_close(shard["grads"][name], gradient, rtol=1e-3, atol=1e-4, msg=name)


def test_the_ranks_targets_together_cover_the_classes_as_one_batch_does():
    cpu = torch.device("cpu")
    one_batch = balanced_targets(64, 10, cpu)
    shares = torch.cat([balanced_targets(64 // RANKS, 10, cpu, index) for index in range(RANKS)])
    assert torch.equal(torch.bincount(shares, minlength=10), torch.bincount(one_batch, minlength=10))


def test_batch_and_pool_sizes_are_the_whole_runs_and_must_split_evenly(monkeypatch):
    options = preset_config("pool", "tiny").options
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    share = split_across_ranks(options)
    assert (share.batch_size, share.student_batch, share.pool_size) == (64, 64, 4096)
    assert (share.synth_steps, share.lr_student) == (options.synth_steps, options.lr_student)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(DfadError, match=r"batch_size=128 cannot be split evenly across 3 ranks.*batch_size=129"):
        split_across_ranks(options)


# --- stopping and resuming together --------------------------------------------------------------------------------
def _straight_then_interrupted_on_rank_1(teacher, folder) -> None:
    DistillRun(_tiny(), teacher, folder / "straight").run()
    run = DistillRun(_tiny(), teacher, folder / "interrupted")
    if rank() == 1:  # the signal reaches one rank only
        real_iteration, calls = run.method.iteration, []

        def iteration_then_sigterm(progress):
            terms = real_iteration(progress)
            calls.append(1)
            if len(calls) == 5:  # mid-epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
            return terms

        run.method.iteration = iteration_then_sigterm
    try:
        run.run()
    except RunInterrupted:
        (folder / f"stopped-rank{rank()}").touch()


def _resume(teacher, folder) -> None:
    DistillRun(_tiny(), teacher, folder / "interrupted", resume=True).run()


def test_a_signal_to_one_rank_stops_both_and_the_run_resumes_to_the_same_student(tmp_path, digits_teacher):
    on_two_ranks(_straight_then_interrupted_on_rank_1, digits_teacher, tmp_path)
    assert (tmp_path / "stopped-rank0").exists() and (tmp_path / "stopped-rank1").exists()
    state = safe_torch_load(tmp_path / "interrupted" / "last.pt")
    assert (state["epoch"], state["iteration"], state["world_size"], len(state["other_ranks"])) == (1, 2, 2, 1)
    # Of rank 1's method state only what differs between ranks crossed to rank 0 (its pool's manifest), not a second
    # copy of the generator and optimisers.
    assert set(state["other_ranks"][0]["method"]) == {"pool", "bn_previous"}
    with pytest.raises(DfadError, match="2 rank"):  # one process cannot continue a two-rank run
        DistillRun(_tiny(), digits_teacher, tmp_path / "interrupted", resume=True)

    on_two_ranks(_resume, digits_teacher, tmp_path)
    straight = load_checkpoint(tmp_path / "straight" / "student.pt").state_dict
    resumed = load_checkpoint(tmp_path / "interrupted" / "student.pt").state_dict
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # Rank 0 alone wrote the run folder; rank 1 its part of the pool.
    assert [m["epoch"] for m in _metrics(tmp_path / "interrupted")] == [1, 2, 3]
    config = json.loads((tmp_path / "interrupted" / "config.json").read_text())
    assert (config["resolved"]["world_size"], config["resolved"]["rank_seeds"]) == (2, [0, 1])
    assert list((tmp_path / "interrupted" / "ranks" / "rank1" / "pool").glob("shard_*.pt"))


def _nan_on_rank_1(teacher, folder) -> None:
    run = DistillRun(_tiny(log_every=1), teacher, folder / "run")
    if rank() == 1:
        run.method.iteration = nan_from_epoch_2(run.method.iteration)
    try:
        run.run()
    except DfadError as exc:
        (folder / f"error-rank{rank()}.txt").write_text(str(exc))


def test_a_nan_on_one_rank_stops_both_with_the_last_checkpoint_kept(tmp_path, digits_teacher):
    on_two_ranks(_nan_on_rank_1, digits_teacher, tmp_path)
    for index in range(RANKS):
        assert "non-finite loss at epoch 2" in (tmp_path / f"error-rank{index}.txt").read_text()
    assert safe_torch_load(tmp_path / "run" / "last.pt")["epoch"] == 1


def _failing_on_rank_1(teacher, folder) -> None:
    """Rank 1 fails alone mid-epoch 2 (as a full disk or a bad image would); each rank records how it ended, as the
    command line would report it, and when."""
    run = DistillRun(_tiny(), teacher, folder / "run")
    if rank() == 1:
        real_iteration, calls = run.method.iteration, []

        def iteration_then_failure(progress):
            calls.append(1)
            if len(calls) == 5:
                raise DfadError("no space left on device (rank 1's disk)")
            return real_iteration(progress)

        run.method.iteration = iteration_then_failure
    (folder / f"started-rank{rank()}").write_text(str(time.time()))
    run.run()


def _recording_how_each_rank_ends(rank_index: int, port: int, function, args) -> None:
    folder = args[-1]
    try:
        _as_rank(rank_index, port, function, args)
    except DfadError as exc:
        (folder / f"error-rank{rank_index}.txt").write_text(f"{time.time()}\n{exc.user_message()}")


def test_a_failure_on_one_rank_stops_every_rank_within_seconds_with_its_message(tmp_path, digits_teacher):
    mp.start_processes(_recording_how_each_rank_ends, args=(_free_port(), _failing_on_rank_1, (digits_teacher, tmp_path)),
                       nprocs=RANKS, start_method="spawn")
    ended = {}
    for index in range(RANKS):
        stopped_at, message = (tmp_path / f"error-rank{index}.txt").read_text().split("\n", 1)
        assert "no space left on device (rank 1's disk)" in message
        ended[index] = float(stopped_at)
    assert "rank 1 failed" in (tmp_path / "error-rank0.txt").read_text()
    assert ended[0] - ended[1] < 15  # not the 30-minute collective timeout


def _resolving_in_turn(teacher, folder) -> None:
    """Each rank records when it resolves --eval-data and whether it may download."""
    import dfad_edge.distill.loop as loop

    original = loop.resolve_source

    def resolve(name, data_dir, download):
        log = folder / f"resolve-rank{rank()}.txt"
        log.write_text(f"{time.time()} {download}")
        if rank() == 0:
            time.sleep(1.0)  # a download in progress
        log.write_text(log.read_text() + f" {time.time()}")
        return original(name, data_dir, download)

    loop.resolve_source = resolve
    DistillRun(_tiny(), teacher, folder / "run", eval_data="digits", download=True)


def test_one_rank_per_machine_downloads_the_evaluation_data_and_the_others_wait_for_it(tmp_path, digits_teacher):
    on_two_ranks(_resolving_in_turn, digits_teacher, tmp_path)
    (start0, download0, end0), (start1, download1, end1) = (
        (tmp_path / f"resolve-rank{index}.txt").read_text().split() for index in range(RANKS))
    assert (download0, download1) == ("True", "False")
    assert float(start1) >= float(end0)


# --- the commands under torchrun -----------------------------------------------------------------------------------
def test_a_torchrun_distillation_stopped_and_resumed_keeps_95_percent_of_the_teacher(tmp_path, digits_teacher):
    out = tmp_path / "run"
    command = TORCHRUN + ["distill", "--teacher", str(digits_teacher), "--out", str(out), "--device", "cpu",
                          "--eval-data", "digits", "--set", "checkpoint_minutes=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as Ctrl-C or a scheduler's kill: torchrun passes it to both ranks
    _, errors = process.communicate(timeout=120)
    assert process.returncode != 0 and "Continue with: torchrun" in errors, errors
    epochs = preset_config("auto", "auto", "tiny").epochs  # the default run for a digits teacher
    assert 1 <= safe_torch_load(out / "last.pt")["epoch"] < epochs

    resumed = subprocess.run(TORCHRUN + ["distill", "--out", str(out), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("student: ") == 1  # rank 0 speaks for the run
    assert [m["epoch"] for m in _metrics(out)] == list(range(1, epochs + 1))
    result = json.loads((out / "result.json").read_text())
    teacher = evaluate_checkpoint(digits_teacher, "digits", torch.device("cpu"))["accuracy"]["100%"]
    student = evaluate_checkpoint(out / "student.pt", "digits", torch.device("cpu"))["accuracy"]["100%"]
    assert student == pytest.approx(result["shipped"]["test_accuracy"]["100%"], abs=1e-6)
    assert student >= 0.95 * teacher, (student, teacher)


def test_train_teacher_under_torchrun_trains_one_teacher_that_rank_0_writes(tmp_path):
    out = tmp_path / "teacher"
    # One process trains this configuration to 96% (8 epochs of batch 64).
    config = TeacherConfig(data="digits", arch="digits_cnn_small", epochs=8, batch_size=64, lr=0.05, device="cpu")
    result = subprocess.run(TORCHRUN + ["train-teacher", "--data", "digits", "--arch", "digits_cnn_small", "--epochs", "8",
                                        "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("test accuracy") == 1
    assert evaluate_checkpoint(out / "teacher.pt", "digits", torch.device("cpu"))["accuracy"]["100%"] >= 0.93
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8
    assert json.loads((out / "config.json").read_text())["rank_seeds"] == [0, 1]
    with pytest.raises(DfadError, match="2 rank"):
        train_teacher(config, out, resume=True)
