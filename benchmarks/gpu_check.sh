#!/usr/bin/env bash
# On a CUDA machine, from the repository root, with .gpu-bundle/ (make gpu-bundle) sent along: docs/gpu.md.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
