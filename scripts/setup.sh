#!/usr/bin/env bash
# Installs ttpeft and its dependencies into the current Python (a virtual environment if one is active).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# A bare "torch" requirement pulls a multi-GB CUDA build; take the CPU 2.13.0 build when none is installed.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install --quiet "torch==2.13.0"
"$PYTHON" -m pip install --quiet -e ".[test]"
