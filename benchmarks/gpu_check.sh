#!/usr/bin/env bash
# The GPU check in one command (about 9 minutes on one H200): GPU tests, throughput of one
# run and of several runs sharing the GPU, then the 300-epoch ISIC 2017 paper run, whose
# compact evidence lands in $OUT (or ./gpu-check-out).
#   make gpu-bundle                      # here: data/gpu-bundle/isic2017 from ../shared/data
#   bash benchmarks/gpu_check.sh         # there: uses the python3 found, no installs
# On the device tool: run(command="bash benchmarks/gpu_check.sh", carry=["data/gpu-bundle"]).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu-check-out}"
DATA="${GPU_CHECK_DATA:-data/gpu-bundle/isic2017}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PYTHON" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "pandas", "yaml", "tqdm", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; carry their wheels and pip install them")
PY
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_data_device.py 2>&1 | tee "$OUT/gpu_tests.log"
"$PYTHON" benchmarks/gpu_check.py --data "$DATA" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
