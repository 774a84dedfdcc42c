#!/usr/bin/env bash
# The README's test command (and CI's): install what the tests need, then run them.
# Tests marked `comfyui` run only where COMFYUI_PATH points at a ComfyUI checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python -m pytest -q -ra "$@"
# The GPU benchmark's CPU rehearsal (bench/README.md), so bench/gpu.sh cannot rot between GPU runs:
# on the whole suite only; inside ComfyUI where COMFYUI_PATH names one, else (CI) on the diffusers host.
if [ $# -eq 0 ]; then
  smoke=$(mktemp -d)
  PYTHON=python bash bench/gpu.sh --cpu-smoke --out "$smoke"
  rm -rf "$smoke"
fi
