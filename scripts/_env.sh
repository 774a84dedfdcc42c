# Sourced by the scripts: use the active virtual environment, or make ./.venv and use that, then
# install torch (CPU wheel, pinned so nothing pulls a multi-GB CUDA build) and this package.
set -euo pipefail
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1
