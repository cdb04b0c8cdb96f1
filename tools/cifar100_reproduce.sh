#!/usr/bin/env bash
# The headline experiment on one desktop GPU: CIFAR-100, ResNet-34 (8x) teacher -> ResNet-18 (8x) student,
# data-free; then ONNX/FP16/INT8/TensorRT export and a bench of student against teacher.
#
#   tools/cifar100_reproduce.sh [ROOT]            # everything under ROOT (default runs/cifar100)
#   TEACHER_CKPT=path/to/cifar100-resnet34_8x.pt tools/cifar100_reproduce.sh   # import a teacher instead of training one
#   PLAIN=1 tools/cifar100_reproduce.sh           # the published recipe only (no remedies), for comparison
#   SMOKE=1 DATA=digits TEACHER_ARCH=digits_cnn STUDENT=digits_cnn_small DEVICE=cpu tools/cifar100_reproduce.sh /tmp/smoke
#                                                 # tiny budgets: checks every step of this script in a minute on a CPU
#
# Resumable: each finished step is skipped, an interrupted distillation continues from its last.pt.
# Sized for one desktop GPU (>= 12 GB): teacher ~1.5 h, distillation (500 epochs x 50 iterations, batch 256)
# several hours depending on the GPU. CIFAR-100 is downloaded to ROOT/data once (needs network for that step).
set -euo pipefail
ROOT=${1:-runs/cifar100}
DATA=${DATA:-cifar100}                  # or cifar10, digits, or an ImageFolder root with train/ and test/
TEACHER_ARCH=${TEACHER_ARCH:-resnet34_8x}
TEACHER_SIZE=${TEACHER_SIZE:-}          # HxW to train the teacher at (default: the architecture's)
STUDENT=${STUDENT:-resnet18_8x}       # the DFKD literature's CIFAR student for a ResNet-34 teacher
DEVICE=${DEVICE:-cuda}
MEAN=${MEAN:-0.5071,0.4865,0.4409}      # CIFAR-100 training statistics, for an imported teacher; check yours
STD=${STD:-0.2673,0.2564,0.2762}
DATA_DIR="$ROOT/data"
TEACHER_BUDGET="--epochs 200 --batch-size 128"
METHOD=${METHOD:-auto}                  # dfad, pool or prior; auto: the default for the teacher's kind of data
# IMAGES: unlabeled images for the prior method (a file, folder or glob, passed as one argument)
DISTILL_BUDGET=${DISTILL_BUDGET:---budget 4h}  # the schedule is planned to end then (the presets are sized for a CPU)
EXPORT_BUDGET=${EXPORT_BUDGET:---max-batch 256}
BENCH_BUDGET="--batch-sizes 1,32,256"
if [ -n "${SMOKE:-}" ]; then
  TEACHER_BUDGET="--epochs 1 --batch-size 64"
  DISTILL_BUDGET="--budget 8s --set epochs=2"
  EXPORT_BUDGET="--max-batch 8 --calib-images 64"
  BENCH_BUDGET="--batch-sizes 1,8 --iterations 3 --warmup 1 --rounds 1"
fi
mkdir -p "$ROOT"

# 1. Teacher: import the published DFAD checkpoint if you have it, otherwise train one (~78% top-1 after 200 epochs).
if [ ! -f "$ROOT/teacher/teacher.pt" ]; then
  if [ -n "${TEACHER_CKPT:-}" ]; then
    mkdir -p "$ROOT/teacher"
    dfad-edge import "$TEACHER_CKPT" --arch "$TEACHER_ARCH" --mean "$MEAN" --std "$STD" --out "$ROOT/teacher/teacher.pt"
  else
    dfad-edge train-teacher --data "$DATA" --data-dir "$DATA_DIR" --download --arch "$TEACHER_ARCH" $TEACHER_BUDGET \
      ${TEACHER_SIZE:+--input-size "$TEACHER_SIZE"} \
      --lr 0.1 --device "$DEVICE" --out "$ROOT/teacher" $( [ -f "$ROOT/teacher/last.pt" ] && echo --resume )
  fi
fi
[ -f "$ROOT/teacher/eval.json" ] ||
  dfad-edge eval "$ROOT/teacher/teacher.pt" --data "$DATA" --data-dir "$DATA_DIR" --device "$DEVICE" --json "$ROOT/teacher/eval.json"

# 2. Distillation: the default method for the teacher's kind of data (METHOD=auto), or the published DFAD recipe with
#    PLAIN=1. The test set is only observed (each epoch); the student that ships is the last epoch's.
RUN="$ROOT/distill"
METHOD_ARGS="--method $METHOD --student $STUDENT"
[ -n "${PLAIN:-}" ] && { RUN="$ROOT/distill-plain"; METHOD_ARGS="--method dfad --preset cifar100"; DISTILL_BUDGET=""; }
if [ ! -f "$RUN/result.json" ]; then
  if [ -f "$RUN/last.pt" ]; then
    dfad-edge distill --out "$RUN" --eval-data "$DATA" --data-dir "$DATA_DIR" --device "$DEVICE" --resume
  else
    dfad-edge distill --teacher "$ROOT/teacher/teacher.pt" --out "$RUN" $METHOD_ARGS --eval-data "$DATA" \
      --data-dir "$DATA_DIR" --device "$DEVICE" $DISTILL_BUDGET ${IMAGES:+--images "$IMAGES"}
  fi
fi

# 3. Export student and teacher: ONNX, FP16, INT8 calibrated on generator images (data-free), TensorRT engines.
#    Without TensorRT the engines are skipped with a message and everything else is kept.
for ROLE in student teacher; do
  CKPT="$RUN/student.pt"; [ "$ROLE" = teacher ] && CKPT="$ROOT/teacher/teacher.pt"
  if [ ! -f "$ROOT/export-$ROLE/export.json" ]; then
    dfad-edge export "$CKPT" --out "$ROOT/export-$ROLE" --int8 --fp16 --synthetic "$RUN/synthetic.pt" \
      $EXPORT_BUDGET --tensorrt || echo "note: TensorRT engines for the $ROLE were not built (see the message above)"
  fi
done

# 4. Bench on this machine.
[ -f "$ROOT/bench/report.json" ] ||
  dfad-edge bench --teacher "$ROOT/export-teacher" --student "$ROOT/export-student" --data "$DATA" \
    --data-dir "$DATA_DIR" --out "$ROOT/bench" --device "$DEVICE" $BENCH_BUDGET
python "$(dirname "$0")/summarize_run.py" "$RUN" --plot "$RUN/progress.png"
echo "done: $ROOT/teacher/eval.json, $RUN/result.json, $ROOT/bench/report.md"
