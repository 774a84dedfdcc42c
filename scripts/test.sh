#!/usr/bin/env bash
# The README's test command (and CI's): install what the tests need, then run them.
# Tests marked `comfyui` run only where COMFYUI_PATH points at a ComfyUI checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python -m pytest -q -ra "$@"
# The GPU benchmark's CPU rehearsal (bench/README.md), so bench/gpu.sh cannot rot between GPU runs:
# on the whole suite only, and only where a ComfyUI folder is named.
if [ $# -eq 0 ]; then
  if [ -n "${COMFYUI_PATH:-}" ]; then
    PYTHON=python bash bench/gpu.sh --cpu-smoke --out "$(mktemp -d)"
  else
    echo "bench/gpu.sh --cpu-smoke skipped: COMFYUI_PATH is not set"
  fi
fi
