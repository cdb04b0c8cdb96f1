#!/usr/bin/env bash
# The headline experiment on one desktop GPU: CIFAR-100, ResNet-34 (8x) teacher -> ResNet-18 (8x) student,
# data-free; then ONNX/FP16/INT8/TensorRT export and a bench of student against teacher.
#
#   tools/cifar100_reproduce.sh [ROOT]            # everything under ROOT (default runs/cifar100)
#   TEACHER_CKPT=path/to/cifar100-resnet34_8x.pt tools/cifar100_reproduce.sh   # import a teacher instead of training one
#   PLAIN=1 tools/cifar100_reproduce.sh           # the published recipe only (no remedies), for comparison
#
# Resumable: each finished step is skipped, an interrupted distillation continues from its last.pt.
# Sized for one desktop GPU (>= 12 GB): teacher ~1.5 h, distillation (500 epochs x 50 iterations, batch 256)
# several hours depending on the GPU. CIFAR-100 is downloaded to ROOT/data once (needs network for that step).
set -euo pipefail
ROOT=${1:-runs/cifar100}
DATA_DIR="$ROOT/data"
mkdir -p "$ROOT"

# 1. Teacher: import the published DFAD checkpoint if you have it (mean/std are the CIFAR-100 training statistics
#    it was trained with; check yours), otherwise train one (~78% top-1 after 200 epochs).
if [ ! -f "$ROOT/teacher/teacher.pt" ]; then
  if [ -n "${TEACHER_CKPT:-}" ]; then
    mkdir -p "$ROOT/teacher"
    dfad-edge import "$TEACHER_CKPT" --arch resnet34_8x --mean 0.5071,0.4865,0.4409 --std 0.2673,0.2564,0.2762 \
      --out "$ROOT/teacher/teacher.pt"
  else
    dfad-edge train-teacher --data cifar100 --data-dir "$DATA_DIR" --download --arch resnet34_8x --epochs 200 \
      --batch-size 128 --lr 0.1 --out "$ROOT/teacher" $( [ -f "$ROOT/teacher/last.pt" ] && echo --resume )
  fi
fi
dfad-edge eval "$ROOT/teacher/teacher.pt" --data cifar100 --data-dir "$DATA_DIR" --json "$ROOT/teacher/eval.json"

# 2. Distillation: the paper's recipe plus the remedies (BN-statistics matching, class balance, replay),
#    or the plain recipe with PLAIN=1. The CIFAR-100 test set is used only to pick the best epoch and report.
RUN="$ROOT/distill"
REMEDIES="--bn-stats 10 --class-balance 1 --replay 16384"
[ -n "${PLAIN:-}" ] && { RUN="$ROOT/distill-plain"; REMEDIES=""; }
if [ ! -f "$RUN/result.json" ]; then
  if [ -f "$RUN/last.pt" ]; then
    dfad-edge distill --teacher "$ROOT/teacher/teacher.pt" --out "$RUN" --eval-data cifar100 --data-dir "$DATA_DIR" --resume
  else
    dfad-edge distill --teacher "$ROOT/teacher/teacher.pt" --out "$RUN" --preset cifar100 --eval-data cifar100 \
      --data-dir "$DATA_DIR" --eval-every 5 $REMEDIES
  fi
fi

# 3. Export student and teacher: ONNX, FP16, INT8 calibrated on generator images (data-free), TensorRT engines.
#    Without TensorRT the engines are skipped with a message and everything else is kept.
for ROLE in student teacher; do
  CKPT="$RUN/student.pt"; [ "$ROLE" = teacher ] && CKPT="$ROOT/teacher/teacher.pt"
  if [ ! -f "$ROOT/export-$ROLE/export.json" ]; then
    dfad-edge export "$CKPT" --out "$ROOT/export-$ROLE" --int8 --fp16 --generator "$RUN/generator.pt" \
      --max-batch 256 --tensorrt || echo "note: TensorRT engines for the $ROLE were not built (see the message above)"
  fi
done

# 4. Bench on this GPU.
dfad-edge bench --teacher "$ROOT/export-teacher" --student "$ROOT/export-student" --data cifar100 \
  --data-dir "$DATA_DIR" --out "$ROOT/bench" --device cuda --batch-sizes 1,32,256
python "$(dirname "$0")/summarize_run.py" "$RUN" --plot "$RUN/progress.png"
