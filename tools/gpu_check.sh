#!/usr/bin/env bash
# Every CUDA path of dfad-edge in one command (at most ~15 minutes on one GPU); see tools/gpu_check.py.
#   tools/gpu_check.sh [OUT]                        # on a machine with one CUDA GPU
#   tools/gpu_check.sh OUT --smoke --device cpu     # the plumbing alone, on a CPU
# For the CIFAR-10 figures, carry the shared data in the git-ignored .gpu/ folder first:
#   mkdir -p .gpu/weights && cp -r ../shared/data/cifar10-jpeg .gpu/ && cp ../shared/weights/cifar10-resnet/*.th .gpu/weights/
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
