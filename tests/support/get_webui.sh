#!/bin/bash
# get_webui.sh forge FORGE_GITDIR HF_GUESS_GITDIR ASSETS_GITDIR [DEST]
# Writes Stable Diffusion WebUI Forge (the snapshot's HEAD) and the repositories its launch script
# clones (lllyasviel/huggingface_guess for the backend, AUTOMATIC1111/stable-diffusion-webui-assets
# for the UI's static files, each at the commit modules/launch_utils.py pins) out of their git
# directories into DEST (default ~/.cache/likeness/forge), laid out as Forge's own launch lays them
# out: DEST/repositories/<name>.  Prints DEST; set FORGE_PATH to it.
# Offline: the git directories come from any mirror or clone (`git clone --mirror` elsewhere and
# copy them over).  Forge is AGPL-3.0 host code: run and test against it, never copy it into the
# project.  Never writes inside the Likeness checkout.
set -eu
what=${1:?usage: get_webui.sh forge FORGE_GITDIR HF_GUESS_GITDIR ASSETS_GITDIR [DEST]}
[ "$what" = forge ] || { echo "only 'forge' is supported (the AUTOMATIC1111 snapshot is not available here)" >&2; exit 2; }
forge=${2:?FORGE_GITDIR}
guess=${3:?HF_GUESS_GITDIR}
assets=${4:?ASSETS_GITDIR}
dest=${5:-$HOME/.cache/likeness/forge}
guess_commit=84826248b49bb7ca754c73293299c4d4e23a548d   # HUGGINGFACE_GUESS_HASH in Forge's launch_utils.py
assets_commit=6f7db241d2f8ba7457bac5ca9753331f0c266917  # ASSETS_COMMIT_HASH there
git --git-dir="$guess" cat-file -e "$guess_commit^{commit}" 2>/dev/null || { echo "commit $guess_commit not in $guess" >&2; exit 1; }
git --git-dir="$assets" cat-file -e "$assets_commit^{commit}" 2>/dev/null || { echo "commit $assets_commit not in $assets" >&2; exit 1; }
case "$(realpath -m "$dest")" in "$(realpath "$(dirname "$0")/../..")"*) echo "DEST must be outside the checkout" >&2; exit 2;; esac
mkdir -p "$dest/repositories/huggingface_guess" "$dest/repositories/stable-diffusion-webui-assets"
git --git-dir="$forge" archive HEAD | tar -x -C "$dest"
git --git-dir="$guess" archive "$guess_commit" | tar -x -C "$dest/repositories/huggingface_guess"
git --git-dir="$assets" archive "$assets_commit" | tar -x -C "$dest/repositories/stable-diffusion-webui-assets"
echo "$dest"
