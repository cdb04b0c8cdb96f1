"""Ablation: what each component of the distillation methods contributes, at the same time budget and seeds.

    python benchmarks/ablation.py --teacher runs/teacher/teacher.pt --eval-data digits --budget 20s --seeds 0 1 2
    python benchmarks/ablation.py --teacher r56.pt --eval-data CIFAR10_TEST_DIR --budget 5m --seeds 0 --only dfad

Each variant is the configuration `dfad-edge distill` picks for the teacher (``--method auto``) or the pool method's
preset, with one component switched: a real `dfad-edge distill` run in its own process, with the same ``--budget``
(a slower variant gets fewer iterations, as it would in a user's run). The figure is the accuracy of the student that
ships (the last epoch's; no labels choose it) on the full --eval-data test set, with the synthetic images' class
entropy in the last epoch (1.0: the teacher sees every class equally often; low: the generator collapsed).

Results go to benchmarks/results/ablation-<name>.json after every run (the Markdown table at the end); a second call
with the same --name skips the runs already recorded (an interrupted ablation continues), and refuses to mix in
results of another teacher, test set, budget or machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dfad_edge.checkpoint import load_checkpoint
from dfad_edge.cli import parse_budget
from dfad_edge.distill import preset_config, teacher_kind
from dfad_edge.env import collect_environment
from dfad_edge.io import atomic_write_json, atomic_write_text
from dfad_edge.runtime import cpu_bf16_instructions


@dataclass(frozen=True)
class Variant:
    name: str
    component: str  # what the variant tells about
    method: str  # auto (the default for the teacher), dfad or pool
    preset: str
    changes: tuple[str, ...] = ()  # --set key=value

    @property
    def family(self) -> str:
        return "pool" if self.method == "pool" else "dfad"


DEFAULT, POOL = "the default (dfad with remedies)", "the pool method"
VARIANTS = (
    Variant("default", "final configuration", "auto", "auto"),
    Variant("default, no BN-statistics term", DEFAULT, "auto", "auto", ("bn_stats=0",)),
    Variant("default, no class-balance term", DEFAULT, "auto", "auto", ("class_balance=0",)),
    Variant("default, no replay memory", DEFAULT, "auto", "auto", ("replay_size=0",)),
    Variant("default, KL loss (T = 1) instead of L1", DEFAULT, "auto", "auto", ("student_loss=kl",)),
    Variant("default, fp32 (amp off)", DEFAULT, "auto", "auto", ("amp=off",)),
    Variant("default, student from random weights", DEFAULT, "auto", "auto", ("student_init=random",)),
    Variant("plain DFAD: no remedy", DEFAULT, "dfad", "auto", ("bn_stats=0", "class_balance=0", "replay_size=0",
                                                                "student_init=random")),
    Variant("pool preset", "pool: its measured configuration", "pool", "auto"),
    Variant("pool, no reuse (holds only the newest images)", POOL, "pool", "auto", ("pool_size={fresh_images}",)),
    Variant("pool, 5 synthesis steps per batch", POOL, "pool", "auto", ("synth_steps=5",)),
    Variant("pool, 2 meta-learnt (first-order MAML) steps", POOL, "pool", "auto", ("meta=fomaml", "synth_steps=2")),
    Variant("pool, class-conditional generator input", POOL, "pool", "auto", ("generator_input=label",)),
    Variant("pool, sigmoid pixel generator", POOL, "pool", "auto", ("generator=pixels",)),
    Variant("pool, fresh teacher logits (no cache)", POOL, "pool", "auto", ("cache_logits=false",)),
    Variant("pool, masked-KL adversarial term", POOL, "pool", "auto", ("adversarial_loss=masked_kl",)),
    Variant("pool, + target-class cross-entropy (0.5)", POOL, "pool", "auto", ("ce=0.5",)),
    Variant("pool, L1 student loss instead of KL (T = 20)", POOL, "pool", "auto", ("student_loss=l1",)),
    Variant("pool, augmented student batches", POOL, "pool", "auto", ("student_augment=true",)),
    Variant("pool, augmented views for synthesis", POOL, "pool", "auto", ("synth_augment=true",)),
)


def fresh_images_per_batch(teacher: Path, method: str, preset: str) -> int:
    """What one synthesis round of the pool preset adds (its batch and forward-only batches): a pool of that size
    holds only the newest images."""
    kind = teacher_kind(load_checkpoint(teacher).input_spec.height)
    options = preset_config(method, preset, kind).options
    return options.batch_size * (1 + options.samples_per_step)


def run_variant(variant: Variant, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One `dfad-edge distill` run; its outcome, or {"error": ...} (recorded, so the table says which runs failed)."""
    fresh = fresh_images_per_batch(args.teacher, variant.method, variant.preset) if variant.method == "pool" else 0
    command = [sys.executable, "-m", "dfad_edge", "distill", "--teacher", str(args.teacher), "--out", str(out),
               "--method", variant.method, "--preset", variant.preset, "--budget", args.budget, "--seed", str(seed),
               "--eval-data", args.eval_data]
    for change in variant.changes:
        command += ["--set", change.format(fresh_images=fresh)]
    # Evaluation and start-up are not in the budget: a generous limit that still ends a hung run.
    limit = 3 * 60 * parse_budget(args.budget) + 900
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=limit,
                                   env={**os.environ, "NO_COLOR": "1"})
        if completed.returncode != 0:
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
            return {"seed": seed, "error": " / ".join(tail).replace("|", "/")}
        result = json.loads((out / "result.json").read_text())
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
        config = json.loads((out / "config.json").read_text())
        return {"seed": seed, "accuracy": result["shipped"]["test_accuracy"]["100%"],
                "teacher": result["teacher_accuracy"]["100%"], "class_entropy": last["collapse"]["class_entropy"],
                "train_seconds": result["train_seconds"], "epochs_run": result["epochs_run"],
                "configuration": {"method": config["method"], "preset": config["preset"],
                                  "amp": config["resolved"]["amp_dtype"], "options": config[config["method"]]}}
    except (subprocess.TimeoutExpired, OSError, KeyError, IndexError, ValueError) as error:
        return {"seed": seed, "error": f"{type(error).__name__}: {error}".replace("|", "/")}


def base_of(variant: Variant) -> str:
    """The row a variant is read against: the pool's switches against the pool preset, the rest (and the pool preset
    itself) against the default."""
    return "pool preset" if variant.family == "pool" and variant.name != "pool preset" else "default"


def summary_rows(results: dict, seeds: list[int]) -> list[dict]:
    rows, finished = [], {}
    for variant in VARIANTS:
        outcomes = [results[variant.name][str(seed)] for seed in seeds if str(seed) in results.get(variant.name, {})]
        if not outcomes:
            continue
        runs = {run["seed"]: run for run in outcomes if "accuracy" in run}
        finished[variant.name] = runs
        base = None if variant.name == "default" else base_of(variant)
        base_runs = finished.get(base, {})
        common = sorted(set(runs) & set(base_runs))  # the change is read over the seeds both rows have
        same = bool(runs and base_runs) and next(iter(runs.values()))["configuration"] == \
            next(iter(base_runs.values()))["configuration"]
        rows.append({"variant": variant.name, "component": variant.component, "base": base,
                     "runs": list(runs.values()), "errors": [run for run in outcomes if "error" in run],
                     "mean": statistics.mean(run["accuracy"] for run in runs.values()) if runs else None,
                     "delta_to_base": statistics.mean(runs[seed]["accuracy"] - base_runs[seed]["accuracy"]
                                                      for seed in common) if common else None,
                     "same_configuration_as_base": same})
    return rows


def markdown(rows: list[dict], seeds: list[int], header: dict) -> str:
    lines = [f"# Ablation: teacher {header['teacher']}, test set {header['eval_data']}, budget {header['budget']}, "
             f"seeds {', '.join(map(str, seeds))}", "",
             f"Machine: {header['machine']}. Accuracy of the shipped student (the last epoch's) on the full test set; "
             "class entropy of the teacher's predictions on the last epoch's synthetic images. Each variant is read "
             "against the row it changes (the pool's switches against the pool preset, the rest against the "
             "default), over the seeds both have.", "",
             "| variant | " + " | ".join(f"seed {seed}" for seed in seeds)
             + " | mean | against | change | class entropy |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for row in rows:
        by_seed = {run["seed"]: f"{run['accuracy']:.2%}" for run in row["runs"]}
        by_seed.update({run["seed"]: "failed" for run in row["errors"]})
        mean = "" if row["mean"] is None else f"{row['mean']:.2%}"
        delta = "" if row["delta_to_base"] is None else f"{row['delta_to_base'] * 100:+.2f} points"
        if row["same_configuration_as_base"]:
            delta = "same configuration (nothing to switch for this teacher)"
        entropy = f"{statistics.mean(run['class_entropy'] for run in row['runs']):.2f}" if row["runs"] else ""
        lines.append(f"| {row['variant']} | " + " | ".join(by_seed.get(seed, "") for seed in seeds) +
                     f" | {mean} | {row['base'] or ''} | {delta} | {entropy} |")
    failures = [f"- {row['variant']}, seed {run['seed']}: {run['error']}" for row in rows for run in row["errors"]]
    return "\n".join(lines + (["", "Failed runs:", *failures] if failures else [])) + "\n"


def recorded_results(json_path: Path, header: dict) -> dict:
    """Results of an earlier call to continue, refused if they were measured on something else."""
    if not json_path.exists():
        return {}
    earlier = json.loads(json_path.read_text())
    differing = [key for key in header if earlier.get(key) != header[key]]
    if differing:
        raise SystemExit(f"{json_path} holds an ablation of another {', '.join(differing)}: pass another --name, "
                         "or delete it to start again")
    return earlier["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--eval-data", required=True, help="the test set the shipped students are measured on")
    parser.add_argument("--budget", default="20s", help="training time of every run (20s, 5m, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=("dfad", "pool"), help="only the default's variants, or only the pool's")
    parser.add_argument("--name", help="results file stem (default: from the teacher, test set and budget)")
    args = parser.parse_args()
    name = args.name or re.sub(r"[^A-Za-z0-9]+", "_", f"{args.teacher.resolve().parent.name}-{args.teacher.stem}-"
                                                       f"{Path(args.eval_data).name}-{args.budget}")
    results_dir = Path(__file__).parent / "results"
    json_path, md_path = results_dir / f"ablation-{name}.json", results_dir / f"ablation-{name}.md"
    env = collect_environment()
    header = {"teacher": str(args.teacher.resolve()), "eval_data": args.eval_data, "budget": args.budget,
              "machine": f"{env['cpu']}" + (f", GPU {env['gpu']['name']}" if env["gpu"] else ""),
              "cpu_bf16_instructions": cpu_bf16_instructions()}
    recorded = recorded_results(json_path, header)
    # The default's row stays in every ablation: each variant is read against it (the pool's against the pool preset).
    chosen = [v for v in VARIANTS if args.only in (None, v.family) or v.name == "default"]
    with tempfile.TemporaryDirectory() as scratch:
        # Seeds outermost: drift of the machine over the hours of an ablation hits every variant alike.
        for seed in args.seeds:
            for index, variant in enumerate(chosen):
                if "accuracy" in recorded.get(variant.name, {}).get(str(seed), {}):
                    continue
                print(f"{variant.name}, seed {seed} ...", flush=True)
                outcome = run_variant(variant, seed, args, Path(scratch) / f"{index}-seed{seed}")
                recorded.setdefault(variant.name, {})[str(seed)] = outcome
                print(f"  {outcome.get('accuracy', outcome.get('error'))}", flush=True)
                atomic_write_json(json_path, {**header, "seeds": args.seeds, "results": recorded,
                                              "summary": summary_rows(recorded, args.seeds)})
    text = markdown(summary_rows(recorded, args.seeds), args.seeds, header)
    atomic_write_text(md_path, text)
    print(text)
    print(f"saved {json_path} and {md_path}")


if __name__ == "__main__":
    main()
