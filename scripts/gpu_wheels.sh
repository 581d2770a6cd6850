#!/usr/bin/env bash
# The wheels the GPU machine lacks (facts.md: hydra-core, omegaconf, antlr4, hydra-submitit-launcher,
# submitit, natten), at the versions of this environment, for its Python, into .whl/ (ignored), where
# scripts/gpu_run.sh installs them from. Run here, where PyPI is reachable:
#   bash scripts/gpu_wheels.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET_PY=${1:-3.12}
pinned() { "$PYTHON" -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" "$@"; }
rm -rf .whl && mkdir -p .whl
# Pure-Python wheels from PyPI; antlr4 and natten are sdists, built here (natten builds no kernels without CUDA).
"$PYTHON" -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$TARGET_PY" \
    --no-deps -d .whl $(pinned hydra-core omegaconf hydra-submitit-launcher submitit)
"$PYTHON" -m pip wheel -q --no-deps -w .whl $(pinned antlr4-python3-runtime natten)
ls .whl
