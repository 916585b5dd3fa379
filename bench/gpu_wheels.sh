#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU image lacks for bench/gpu_suite.py and
# bench/calibration_bench.py: diffusers (same version as here) and importlib_metadata (pure Python; the image
# has torch 2.11 + CUDA 13, transformers, huggingface_hub, safetensors, onnx, onnxruntime, numpy, pillow).
# They land in .whl/ (git-ignored through .git/info/exclude) and travel with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
version=$(python -c "import importlib.metadata as m; print(m.version('diffusers'))")
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "diffusers==${version}" importlib_metadata
ls -l .whl
