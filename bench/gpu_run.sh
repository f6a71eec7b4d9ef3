#!/usr/bin/env bash
# The GPU run (bench/gpu_run.py, see docs/gpu_run.md) with the wheels carried in .whl/, installed into
# /tmp/site when there are any:   bash bench/gpu_run.sh --out "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_run.py "$@"
