#!/usr/bin/env bash
# Set up slimdiff on a fresh machine and run its main job on the embedded default model:
# slim builtin:proxy (the project's trained proxy model), export dense and slim UNets to ONNX Runtime engines,
# verify them against PyTorch (the dense engine in a second process while the first slims: --jobs 2), then measure dense vs slim latency and error of those very models and engines
# (eager PyTorch and ONNX Runtime; the bench reads the export folder and builds nothing again).
set -euo pipefail
cd "$(dirname "$0")/.."
# --no-compile: pip would byte-compile every module of every wheel (most never imported); Python compiles the
# ones a program imports on first use.
python -m pip install -q --no-compile torch==2.13.0          # the CPU wheel; GPU machines may keep their own torch
python -m pip install -q --no-compile -e '.[test]'
slimdiff-export --model builtin:proxy --engine ort --out out/proxy-ort --force --num-prompts 8 --steps 8 --jobs 2
slimdiff bench --model out/proxy-ort --engines eager,ort --threads 1 --e2e-runs 2 --out out/proxy-bench --force
