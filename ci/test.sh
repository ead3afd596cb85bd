#!/usr/bin/env bash
# Install everything the tests need, then run them; extra arguments go to pytest.
# Triton kernels run under Triton's interpreter where there is no GPU (design.md §6).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh dev
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export TRITON_INTERPRET=1
fi
python -m pytest -q "$@"
