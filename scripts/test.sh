#!/usr/bin/env bash
# The README's test command (and CI's): install what the tests need, then run them.
# Tests marked `comfyui` run only where COMFYUI_PATH points at a ComfyUI checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python -m pytest -q -ra "$@"
