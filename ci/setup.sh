#!/usr/bin/env bash
# Create ./.venv if needed and install the project into it; `ci/setup.sh dev` adds test tools.
# torch: where none is installed, take 2.13.0, the CPU build on this disk (an unpinned torch
# would pull a multi-GB CUDA build); a machine that already has torch (the GPU image) keeps it,
# which is why the venv sees the system site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
if [ "${1:-}" = dev ]; then
    python -m pip install -q -e ".[dev]"
else
    python -m pip install -q -e .
fi
