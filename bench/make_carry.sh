#!/usr/bin/env bash
# Assemble .carry/ (git-ignored): everything the GPU machine needs beside this checkout, with no
# network there - a ComfyUI tree without .git and models, a copy of the shared bench (the anchors),
# and the wheels a bare machine with PyTorch lacks.  Checks the 64 MiB limit.  See bench/README.md.
#   COMFYUI_PATH   ComfyUI v0.20.1 folder        (default ~/.cache/likeness/ComfyUI)
#   SHARED_BENCH   the anchors' folder            (default ../shared/bench beside the checkout)
#   PY_VERSION     the GPU machine's Python       (default 3.12)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
comfy=${COMFYUI_PATH:-$HOME/.cache/likeness/ComfyUI}
shared=${SHARED_BENCH:-$repo/../shared/bench}
pyver=${PY_VERSION:-3.12}
out=$repo/.carry
tmp=$repo/.carry.partial
# Missing on a bare PyTorch machine (its package list: torch, transformers, safetensors, scipy, ...):
# ComfyUI's torchsde (+ trampoline) and comfy-aimdo; diffusers (+ importlib_metadata) for the
# SeedSelect anchor only.  comfy-kitchen (fp8/fp4 kernels, ~190 MB) is optional in ComfyUI and left out;
# PyAV is replaced by a stand-in module (bench/comfy_env.py).
WHEELS="torchsde==0.2.6 trampoline==0.1.2 comfy-aimdo==0.3.0 diffusers==0.42.1 importlib_metadata==8.7.0"

[ -f "$comfy/comfy/model_management.py" ] || { echo "no ComfyUI at $comfy (set COMFYUI_PATH)" >&2; exit 2; }
[ -f "$shared/comfy_anchor.py" ] || { echo "no shared bench at $shared (set SHARED_BENCH)" >&2; exit 2; }
rm -rf "$tmp"
mkdir -p "$tmp/wheels"
# ComfyUI: the code only (no history, models, tests, API-node clients or docs)
tar -C "$comfy" --exclude=./.git --exclude=./models --exclude=./tests --exclude=./tests-unit \
    --exclude=./comfy_api_nodes --exclude=./output --exclude=./input --exclude=./temp --exclude=./user \
    --exclude='__pycache__' -cf - . | tar -C "$tmp" --one-top-level=ComfyUI -xf -
mkdir -p "$tmp/ComfyUI/models" "$tmp/ComfyUI/comfy_api_nodes"
touch "$tmp/ComfyUI/comfy_api_nodes/__init__.py"
cp -r "$shared" "$tmp/shared-bench"
rm -rf "$tmp/shared-bench/__pycache__"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$tmp/wheels" $WHEELS
git -C "$repo" rev-parse HEAD > "$tmp/COMMIT" 2>/dev/null || true
size=$(du -sm "$tmp" | cut -f1)
if [ "$size" -gt 60 ]; then
  echo "the carry folder is ${size} MiB; the GPU machine takes 64 MiB with the checkout" >&2
  exit 1
fi
rm -rf "$out"
mv "$tmp" "$out"
echo "$out: ${size} MiB (ComfyUI $(du -sm "$out/ComfyUI" | cut -f1) MiB, wheels $(du -sm "$out/wheels" | cut -f1) MiB)"
