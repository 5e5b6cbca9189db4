#!/usr/bin/env bash
# On the GPU machine: install the carried wheels (.whl/, from benchmarks/gpu_wheels.sh), then
# run benchmarks/gpu_check.py with sam_blocked from this tree; arguments go to gpu_check.py.
#
#     bash benchmarks/gpu_check.sh                  # everything into $OUT, within 8 minutes
#     bash benchmarks/gpu_check.sh --dry-run --out /tmp/check   # the CPU rehearsal
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
