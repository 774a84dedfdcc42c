#!/usr/bin/env bash
# The README's test command: install what the tests need into the active Python, then run them.
# torch is installed first and pinned to the CPU wheel the project is tested with, so that the
# other packages do not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1
python -m pytest -q -ra "$@"
