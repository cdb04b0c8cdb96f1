"""The TensorRT INT8 graph made several ways, compared on accuracy (ONNX Runtime, CPU) and on structure.

    python benchmarks/trt_int8_graphs.py CHECKPOINT --data SRC --name NAME (--calib SRC | --synthetic PATH)
        [--calib-images 512] [--test-images N]

Graphs: ONNX Runtime's quantizer as it writes the graph (Q/DQ on both inputs of every residual Add); the same after
NVIDIA's placement (export/qdq_placement.py), typed FP32 and typed FP16 outside the Q/DQ pairs (what export ships);
NVIDIA ModelOpt's graph, matched to dfad-edge's choices (min-max calibration, stem and classifier in float) typed
FP16 and FP32, and with ModelOpt's defaults (entropy calibration, every layer); and the ONNX Runtime CPU graph (U8S8)
for reference. ModelOpt runs through its command line with --modelopt-python (a venv of its own, see
dfad_edge/export/modelopt_quantize.py); without it the ModelOpt rows are skipped.

ONNX Runtime's CPU provider has few FP16 kernels: it runs an FP16-typed graph by casting to FP32 around the layers it
lacks and dropping the casts in between, so its figure for an FP16 graph shows FP16 weights and scales but not FP16
activations (and 1.24.4 computes FP16 QDQ graphs wrongly: 54% agreement with FP32 on the ResNet-56; 1.30 and
1.32 do not). The "FP16 storage emulated" columns round every FP16 tensor of the graph to FP16 after each layer and compute
in FP32 (fp16_storage_emulation), which is how TensorRT's FP16 kernels store their outputs (most of them accumulate in
FP32; only an engine on a GPU is the final word).

Prints a Markdown table and saves benchmarks/results/trt_int8_graphs-NAME.{json,md}. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch

from dfad_edge.checkpoint import load_checkpoint
from dfad_edge.data import make_loader, resolve_source
from dfad_edge.env import collect_environment
from dfad_edge.errors import DfadError
from dfad_edge.export.calibration import dataset_images, synthetic_images
from dfad_edge.export.fp16_typing import fp16_storage_emulation, type_fp16_outside_qdq
from dfad_edge.export.modelopt_quantize import modelopt_arguments, modelopt_int8_graph, run_modelopt
from dfad_edge.export.onnx_export import export_onnx, ort_session, run_onnx
from dfad_edge.export.qdq_placement import place_residual_qdq
from dfad_edge.export.qdq_rules import intended_precisions, tensorrt_qdq_violations
from dfad_edge.export.quantize import first_and_last_layers, ort_qdq_graph
from dfad_edge.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).parent / "results"


def variants(fp32_path: Path, images: torch.Tensor, modelopt_python: str | None) -> dict:
    """Name -> a function making that graph (called lazily, so one failure leaves the others)."""
    float_nodes = first_and_last_layers(onnx.load(str(fp32_path)))
    ort_both = lambda: ort_qdq_graph(fp32_path, images, "tensorrt")  # noqa: E731

    def ort_placed():
        model = ort_both()
        place_residual_qdq(model)
        return model

    def modelopt(*arguments):
        if modelopt_python is None:
            raise DfadError("no --modelopt-python given")
        return run_modelopt(fp32_path, images, list(arguments), python=modelopt_python)

    def modelopt_shipped():  # what --int8-quantizer modelopt writes
        if modelopt_python is None:
            raise DfadError("no --modelopt-python given")
        return modelopt_int8_graph(fp32_path, images, "minmax", float_nodes, python=modelopt_python)

    return {
        "ORT quantizer, Q/DQ on both Add inputs, FP32-typed": ort_both,
        "ORT + NVIDIA placement, FP32-typed": ort_placed,
        "ORT + NVIDIA placement, FP16-typed (shipped)": lambda: type_fp16_outside_qdq(ort_placed()),
        "ModelOpt matched, FP16-typed (--int8-quantizer modelopt)": modelopt_shipped,
        "ModelOpt matched, FP32-typed":
            lambda: modelopt(*modelopt_arguments("minmax", float_nodes), "--high_precision_dtype", "fp32"),
        "ModelOpt defaults (entropy, every layer), FP16-typed": lambda: modelopt(),
        "ORT CPU graph (U8S8), FP32-typed": lambda: ort_qdq_graph(fp32_path, images, "cpu"),
    }


def graph_facts(model: onnx.ModelProto) -> dict:
    precisions = intended_precisions(model)
    adds = precisions["layers"].get("Add", {})
    float_types = {p for counts in precisions["layers"].values() for p in counts if not p.startswith("int8")}
    return {"tensorrt_rule_violations": len(tensorrt_qdq_violations(model)),
            "adds_in_nvidia_placement": adds.get("int8, fused into the convolution", 0), "adds": sum(adds.values()),
            "float_type_outside_qdq": "/".join(sorted(float_types)), "io": sorted(set(precisions["inputs_outputs"].values())),
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "bytes": model.ByteSize()}


def predictions(model: onnx.ModelProto, images: np.ndarray, threads: int, scratch: Path) -> np.ndarray:
    path = scratch / "graph.onnx"
    onnx.save(model, str(path))
    session = ort_session(path, threads=threads)
    return np.concatenate([run_onnx(session, images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])


def accuracy(predicted: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
    return {"top1": float((predicted == labels).mean()), "agreement_with_fp32": float((predicted == reference).mean())}


def markdown_table(rows: list[dict]) -> list[str]:
    table = ["| graph | top-1 | agrees with FP32 | top-1, FP16 storage emulated | agrees with FP32 | TensorRT rule "
             "violations | residual Adds in NVIDIA placement | float type outside Q/DQ | I/O |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["graph"]]
        if "skipped" in row:
            cells += [f"skipped: {row['skipped']}"] + [""] * 7
        else:
            emulated = row.get("fp16_storage_emulated")
            cells += [f"{row['top1']:.2%}", f"{row['agreement_with_fp32']:.2%}",
                      f"{emulated['top1']:.2%}" if emulated else "", f"{emulated['agreement_with_fp32']:.2%}" if emulated else ""]
            cells += [str(row["tensorrt_rule_violations"]), f"{row['adds_in_nvidia_placement']}/{row['adds']}",
                      row["float_type_outside_qdq"], "/".join(row["io"])] if "adds" in row else [""] * 4
        table.append("| " + " | ".join(cells) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", required=True, help="test set: digits, cifar10, or an ImageFolder directory")
    parser.add_argument("--name", required=True, help="results file suffix, e.g. resnet56-cifar10")
    calibration_source = parser.add_mutually_exclusive_group(required=True)
    calibration_source.add_argument("--calib", help="real calibration images from this data source (its train split)")
    calibration_source.add_argument("--synthetic", type=Path, help="data-free calibration from a distillation run's "
                                    "synthetic.pt")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--test-images", type=int, help="first N test images (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modelopt-python", help="python of a venv with nvidia-modelopt[onnx] (ModelOpt rows)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trt_int8_graphs"), help="scratch folder for graphs")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    spec = checkpoint.input_spec
    if args.synthetic:
        calibration = synthetic_images(args.synthetic, spec, args.calib_images, 0)
        calibration_source = "synthetic images of the distillation (data-free)"
    else:
        calibration = dataset_images(args.calib, spec, checkpoint.num_classes, checkpoint.class_names, args.calib_images, 0)
        calibration_source = f"{args.calib} (train split)"
    loader = make_loader(resolve_source(args.data), "test", spec, batch_size=256)
    batches = [(x.numpy(), y.numpy()) for x, y in loader]
    images, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    images, labels = images[:args.test_images], labels[:args.test_images]
    args.work.mkdir(parents=True, exist_ok=True)
    fp32_path = args.work / "model.onnx"
    export_onnx(checkpoint.build_model(), checkpoint, fp32_path, 64)
    reference = predictions(onnx.load(str(fp32_path)), images, args.threads, args.work)
    rows = [{"graph": "FP32 ONNX (reference)", **accuracy(reference, labels, reference)}]
    for name, make in variants(fp32_path, calibration, args.modelopt_python).items():
        try:
            model = make()
        except DfadError as exc:
            rows.append({"graph": name, "skipped": str(exc)})
            continue
        row = {"graph": name, **accuracy(predictions(model, images, args.threads, args.work), labels, reference),
               **graph_facts(model)}
        if row["float_type_outside_qdq"] == "fp16":
            emulated = predictions(fp16_storage_emulation(model), images, args.threads, args.work)
            row["fp16_storage_emulated"] = accuracy(emulated, labels, reference)
        rows.append(row)
        print(f"{name}: {row['top1']:.2%}", flush=True)
    table = markdown_table(rows)
    env = collect_environment()
    header = (f"{checkpoint.arch} on {args.data}, {len(labels)} test images, ONNX Runtime {env.get('onnxruntime')} "
              f"CPU ({args.threads} threads, {env.get('cpu')}); calibration: {len(calibration)} images, "
              f"{calibration_source}")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"trt_int8_graphs-{args.name}.md", text)
    atomic_write_json(RESULTS / f"trt_int8_graphs-{args.name}.json",
                      {"checkpoint": args.checkpoint.name, "data": args.data, "calibration": calibration_source,
                       "test_images": len(labels), "rows": rows, "env": env})


if __name__ == "__main__":
    main()
