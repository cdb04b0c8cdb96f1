"""Exercise every CUDA path of dfad-edge in one command, in at most ~15 minutes on one GPU, and summarise.

    tools/gpu_check.sh [OUT]                 # on a machine with one CUDA GPU (default OUT: runs/gpu_check)
    tools/gpu_check.sh OUT --smoke --device cpu   # the plumbing only, tiny budgets, on a CPU

Steps: environment; a teacher (the shared CIFAR-10 ResNet-56 when its weights and the JPEG copy of CIFAR-10 are
carried in .gpu/, else a digits teacher trained here); distillation with bf16, with fp16 and gradient scaling, and
with torch.compile; export of student and teacher (ONNX, FP16, INT8, TensorRT engines where TensorRT is installed);
bench with PyTorch CUDA, ONNX Runtime CUDA and TensorRT rows (CUDA-event compute times); the ImageNet-size recipe in
its smoke form; the distillation throughput benchmark. Writes OUT/gpu_check.json and OUT/gpu_check.md. A step that needs a GPU says so when there is
none, and a failing step is recorded with its error, never hiding the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRIED = REPO / ".gpu"  # git-ignored: data and weights copied in for a GPU machine (../shared does not travel)
CIFAR10_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


class Check:
    def __init__(self, out: Path, device: str, smoke: bool):
        self.out, self.device, self.smoke = out, device, smoke
        self.steps: list[dict] = []

    def run(self, name: str, args: list[str], needs_gpu: bool = False, timeout: int = 900,
            env: dict | None = None) -> bool:
        """One dfad-edge (or other) command, with ``env`` added to the environment; its outcome, time and the tail of
        its output go into the summary."""
        if needs_gpu and self.device == "cpu":
            self.steps.append({"step": name, "status": "skipped", "why": "needs a CUDA GPU (ran with --device cpu)"})
            return False
        started = time.perf_counter()
        command = [str(a) for a in args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env={**os.environ, "DFAD_EDGE_QUIET": "1", **(env or {})})
            status = "ok" if result.returncode == 0 else "failed"
            tail = (result.stdout + result.stderr).strip().splitlines()[-12:]
        except subprocess.TimeoutExpired:
            status, tail = "failed", [f"timed out after {timeout} s"]
        self.steps.append({"step": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
                           "command": " ".join(command), "output_tail": tail})
        print(f"[{status}] {name} ({self.steps[-1]['seconds']} s)", flush=True)
        return status == "ok"


def dfad_edge(*args) -> list:
    return [sys.executable, "-m", "dfad_edge", *args]


def teacher_and_data(check: Check) -> tuple[Path, str]:
    """The shared ResNet-56 on CIFAR-10 when carried, else a digits teacher trained here."""
    weights = sorted((CARRIED / "weights").glob("resnet56-*.th"))
    cifar = CARRIED / "cifar10-jpeg"
    teacher = check.out / "teacher.pt"
    if weights and (cifar / "test").is_dir():
        check.run("import the shared ResNet-56", dfad_edge("import", weights[0], "--arch", "resnet56",
                  "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--classes", CIFAR10_CLASSES,
                  "--out", teacher))
        return teacher, str(cifar)
    check.run("train a digits teacher (no CIFAR-10 in .gpu/)", dfad_edge(
        "train-teacher", "--data", "digits", "--arch", "digits_cnn", "--epochs", "3" if check.smoke else "20",
        "--out", check.out / "teacher-run", "--device", check.device))
    if (check.out / "teacher-run" / "teacher.pt").exists():
        teacher.write_bytes((check.out / "teacher-run" / "teacher.pt").read_bytes())
    return teacher, "digits"


def distill_runs(check: Check, teacher: Path, data: str) -> Path:
    budget = ["--budget", "10s"] if check.smoke else ["--budget", "3m"]
    short = ["--budget", "5s"] if check.smoke else ["--budget", "1m"]
    eval_data = ["--eval-data", data]
    check.run("distill, bf16 autocast (default precision on this GPU)", dfad_edge(
        "distill", "--teacher", teacher, "--out", check.out / "distill-bf16", "--amp", "bf16", "--device", check.device,
        *budget, *eval_data), needs_gpu=False)
    for method in ("dfad", "pool"):
        check.run(f"distill, fp16 with gradient scaling, method {method}", dfad_edge(
            "distill", "--teacher", teacher, "--out", check.out / f"distill-fp16-{method}", "--method", method,
            "--amp", "fp16", "--device", check.device, *short), needs_gpu=True)
    check.run("distill, torch.compile", dfad_edge(
        "distill", "--teacher", teacher, "--out", check.out / "distill-compile", "--compile", "--device", check.device,
        *short), needs_gpu=True)
    check.run("distill, the pool method", dfad_edge(
        "distill", "--teacher", teacher, "--out", check.out / "distill-pool", "--method", "pool", "--device",
        check.device, *short))
    return check.out / "distill-bf16"


def export_and_bench(check: Check, teacher: Path, data: str, run: Path) -> None:
    tensorrt = ["--tensorrt"] if check.device != "cpu" else []
    for role, checkpoint in (("student", run / "student.pt"), ("teacher", teacher)):
        check.run(f"export the {role}: ONNX, FP16, INT8 (data-free calibration)" + (", TensorRT" if tensorrt else ""),
                  dfad_edge("export", checkpoint, "--out", check.out / f"export-{role}", "--int8", "--fp16",
                            "--synthetic", run / "synthetic.pt", "--calib-images", "256", "--device", check.device,
                            *tensorrt))
    iterations = ["--iterations", "5", "--warmup", "2", "--rounds", "1"] if check.smoke else []
    check.run("bench: PyTorch, ONNX Runtime and TensorRT rows" + (" (CUDA-event compute times)" if tensorrt else ""),
              dfad_edge("bench", "--teacher", check.out / "export-teacher", "--student", check.out / "export-student",
                        "--data", data, "--out", check.out / "bench", "--device", check.device, *iterations))
    # The recipe calls dfad-edge and python from PATH: this interpreter's first, as the other steps use it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    check.run("ImageNet-size recipe (tools/imagenet_recipe.sh), smoke form",
              ["bash", REPO / "tools" / "imagenet_recipe.sh", check.out / "imagenet-recipe-smoke"],
              env={"SMOKE": "1", "DEVICE": check.device, "PATH": path})
    check.run("distillation throughput benchmark", [sys.executable, REPO / "benchmarks" / "distill_throughput.py",
              "--device", check.device, "--iterations", "1" if check.smoke else "3",
              "--rounds", "1" if check.smoke else "3", "--batch-size", "16" if check.smoke else "128",
              "--out", check.out / "distill_throughput.json"])


def figures(out: Path) -> dict:
    """The headline numbers of each step's files, where they were written."""
    found = {}
    for run in sorted(out.glob("distill-*")):
        result = run / "result.json"
        if result.is_file():
            data = json.loads(result.read_text())
            found[run.name] = {"train_seconds": data["train_seconds"],
                               "test_top1": (data["shipped"]["test_accuracy"] or {}).get("100%"),
                               "teacher_top1": (data["teacher_accuracy"] or {}).get("100%")}
    report = out / "bench" / "report.json"
    if report.is_file():
        rows = json.loads(report.read_text())["results"]
        found["bench"] = [{k: row.get(k) for k in ("model", "backend", "precision", "skipped")} |
                          {"p50_ms_batch1": row.get("latency_ms", {}).get("1", {}).get("p50"),
                           "compute_ms_batch1": (row.get("compute_ms") or {}).get("1", {}).get("p50"),
                           "top1": (row.get("accuracy") or {}).get("100%")} for row in rows]
    return found


def markdown(summary: dict) -> str:
    lines = [f"# dfad-edge GPU check: {summary['machine']}", "", f"Device: {summary['device']}; "
             f"{'smoke budgets' if summary['smoke'] else 'full budgets'}; {summary['seconds']} s in all.", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for step in summary["steps"]:
        note = step.get("why") or (step["output_tail"][-1] if step.get("output_tail") and step["status"] != "ok" else "")
        lines.append(f"| {step['step']} | {step['status']} | {step.get('seconds', '')} | {note} |")
    for name, entry in summary["figures"].items():
        if name.startswith("distill"):
            lines.append(f"\n{name}: {entry['train_seconds']} s of training, shipped student top-1 {entry['test_top1']}")
    for row in summary["figures"].get("bench", []):
        if not row.get("skipped"):
            lines.append(f"- bench {row['model']} {row['backend']} {row['precision']}: top-1 {row['top1']}, "
                         f"p50 {row['p50_ms_batch1']} ms at batch 1, GPU compute {row['compute_ms_batch1']} ms")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for the plumbing alone")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the steps, not the figures")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from dfad_edge.env import collect_environment

    env = collect_environment()
    if args.device != "cpu" and not env["cuda_available"]:
        sys.exit("error: no CUDA GPU is visible to PyTorch here; run with --device cpu --smoke to check the plumbing")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.device, args.smoke)
    started = time.perf_counter()
    teacher, data = teacher_and_data(check)
    run = distill_runs(check, teacher, data)
    export_and_bench(check, teacher, data, run)
    summary = {"machine": env["gpu"]["name"] if env["gpu"] else env["cpu"], "device": args.device, "smoke": args.smoke,
               "env": env, "seconds": round(time.perf_counter() - started, 1), "steps": check.steps,
               "figures": figures(args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    failed = [s["step"] for s in check.steps if s["status"] == "failed"]
    if failed:
        sys.exit(f"error: {len(failed)} step(s) failed: {', '.join(failed)} (see {args.out / 'gpu_check.md'})")


if __name__ == "__main__":
    main()
