#!/usr/bin/env bash
# An ImageNet-size teacher (a 224-px torchvision or timm classifier) to a small student on one GPU: import, data-free
# distillation with the large-image default (the augmented image prior: crops of photographs, or of your own unlabeled
# images with IMAGES=...), ONNX/FP16/INT8/TensorRT export and a bench, by way of tools/cifar100_reproduce.sh (resumable,
# each finished step skipped).
#
#   TEACHER_CKPT=resnet50.pth DATA=/data/imagenet tools/imagenet_recipe.sh [ROOT]
#       TEACHER_CKPT  the teacher's weights (e.g. torchvision's resnet50-*.pth); TEACHER_ARCH names its architecture
#       DATA          an ImageFolder root whose test/<class>/ holds labelled test images (ImageNet's validation images
#                     sorted into class folders), in the teacher's class order: observed only, never trained on
#       IMAGES        optional: unlabeled images from where the model will run (a folder, file or glob)
#   SMOKE=1 DEVICE=cpu tools/imagenet_recipe.sh /tmp/smoke   # every step in a minute or two: a 72-px digits teacher
#
# Memory and time on a GPU have not been measured yet (no GPU was lent to the session that wrote this): each epoch's
# line in ROOT/distill/metrics.jsonl records peak_memory_mb and images_per_s, and tools/gpu_check.sh runs this script's
# smoke form. On 2 CPU cores the same default peaks at the resident memory docs/results.md gives ("Large images").
set -euo pipefail
export TEACHER_ARCH=${TEACHER_ARCH:-torchvision.resnet50}
export MEAN=${MEAN:-0.485,0.456,0.406} STD=${STD:-0.229,0.224,0.225}   # torchvision's and timm's ImageNet statistics
export STUDENT=${STUDENT:-torchvision.mobilenet_v3_large}
export DISTILL_BUDGET=${DISTILL_BUDGET:---budget 4h --set batch_size=256}
export EXPORT_BUDGET=${EXPORT_BUDGET:---max-batch 64}
if [ -n "${SMOKE:-}" ]; then
  # No weights or ImageNet needed: a small CNN trained for one epoch on the built-in (grey) digits at 72 px, a
  # large-image teacher by its size, so the large-image defaults run end to end.
  export DATA=${DATA:-digits} TEACHER_ARCH=digits_cnn TEACHER_SIZE=72x72 STUDENT=digits_cnn_small
  unset MEAN STD
else
  : "${TEACHER_CKPT:?set TEACHER_CKPT to the weights file of the teacher (see the header of this script)}"
  : "${DATA:?set DATA to an ImageFolder root with test/<class>/ images (see the header of this script)}"
fi
exec bash "$(dirname "$0")/cifar100_reproduce.sh" "${1:-runs/imagenet}"
