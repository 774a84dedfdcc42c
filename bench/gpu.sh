#!/usr/bin/env bash
# One-command GPU benchmark (bench/README.md): the project's steps inside ComfyUI beside the shared
# anchors, RESULT lines on stdout and <out>/gpu_bench.json written as results come.
#   bench/gpu.sh [--out DIR] [--budget SECONDS] [--only NAME ...]      on a GPU machine
#   bench/gpu.sh --cpu-smoke [--out DIR]                               the same code, tiny models, CPU
#                                    (without COMFYUI_PATH: on the CLI's diffusers host, as CI runs it)
#   bench/gpu.sh --cuda-check [--out DIR] [--budget S] [--cpu-smoke]   devtools/gpu/cuda_check.py instead
# Uses .carry/ (bench/make_carry.sh) when present: its wheels are installed into a temp folder
# (never into the machine's Python), its ComfyUI and shared bench are used unless
# COMFYUI_PATH / LIKENESS_SHARED_BENCH say otherwise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
carry=${LIKENESS_CARRY:-$repo/.carry}
py=${PYTHON:-python3}
if compgen -G "$carry/wheels/*.whl" >/dev/null; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/likeness-site.XXXXXX")
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$carry"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${COMFYUI_PATH:-}" ] && [ -d "$carry/ComfyUI" ]; then export COMFYUI_PATH=$carry/ComfyUI; fi
if [ -z "${LIKENESS_SHARED_BENCH:-}" ] && [ -d "$carry/shared-bench" ]; then
  export LIKENESS_SHARED_BENCH=$carry/shared-bench
fi
[ -f "$carry/COMMIT" ] && export LIKENESS_COMMIT=$(cat "$carry/COMMIT")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
script=$repo/bench/gpu.py
if [ "${1:-}" = "--cuda-check" ]; then shift; script=$repo/devtools/gpu/cuda_check.py; fi
if [ -n "${COMFYUI_PATH:-}" ]; then exec "$py" "$script" --comfy "$COMFYUI_PATH" "$@"; fi
# No ComfyUI: the CPU rehearsal (and the benchmark) run on the CLI's diffusers host instead
case " $* " in
  *" --cpu-smoke "*|*" --host diffusers "*) [ "$script" = "$repo/bench/gpu.py" ] && exec "$py" "$script" --host diffusers "$@" ;;
esac
echo "bench/gpu.sh: no ComfyUI: set COMFYUI_PATH or build .carry with bench/make_carry.sh (or pass --host diffusers)" >&2
exit 2
