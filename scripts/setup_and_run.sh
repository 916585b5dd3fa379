#!/usr/bin/env bash
# Set up slimdiff on a fresh machine and run its main job on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # the CPU wheel; GPU machines may keep their own torch
python -m pip install -q -e '.[test]'
slimdiff slim --model builtin:tiny --budget 0.4 --num-prompts 16 --steps 10 --out out/tiny-slim --force
slimdiff inspect out/tiny-slim | tail -n 3
