#!/usr/bin/env bash
# Every GPU-only check of the scaling features in one command on a CUDA machine: the CUDA cases of the
# distributed, precision and bitsandbytes tests, then the FSDP and quantised-base benchmarks
# (results in benchmarks/scaling/results/).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python3 -c "import bitsandbytes" 2>/dev/null || python3 -m pip install -q "bitsandbytes>=0.45"
python3 -m pytest -q -rs tests/test_distributed.py tests/test_precision.py tests/test_quantised.py
python3 benchmarks/scaling/fsdp_gpu.py
python3 benchmarks/scaling/quantised_gpu.py
