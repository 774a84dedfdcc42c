#!/bin/bash
# get_webui.sh forge FORGE_GITDIR HF_GUESS_GITDIR ASSETS_GITDIR [DEST]
# get_webui.sh a1111 A1111_GITDIR STABLEDIFFUSION_GITDIR GENERATIVE_MODELS_GITDIR K_DIFFUSION_GITDIR BLIP_GITDIR ASSETS_GITDIR [DEST]
# Writes a Stable Diffusion WebUI and the repositories its launch script clones (each at the commit
# its modules/launch_utils.py pins) out of their git directories into DEST, laid out as the WebUI's
# own launch lays them out: DEST/repositories/<name>.  Prints DEST.
#   forge: Stable Diffusion WebUI Forge (the snapshot's HEAD) with lllyasviel/huggingface_guess and
#          AUTOMATIC1111/stable-diffusion-webui-assets; DEST defaults to ~/.cache/likeness/forge;
#          set FORGE_PATH to it.
#   a1111: AUTOMATIC1111 v1.10.1 (commit 82a973c0, or $A1111_COMMIT) with Stability-AI/stablediffusion,
#          Stability-AI/generative-models, crowsonkb/k-diffusion, salesforce/BLIP and the assets;
#          DEST defaults to ~/.cache/likeness/a1111; set WEBUI_PATH to it.
# Offline: the git directories come from any mirror or clone (`git clone --mirror` elsewhere and
# copy them over).  The WebUIs are AGPL-3.0 host code: run and test against them, never copy them
# into the project.  Never writes inside the Likeness checkout.
set -eu
usage="usage: get_webui.sh forge FORGE_GITDIR HF_GUESS_GITDIR ASSETS_GITDIR [DEST]
       get_webui.sh a1111 A1111_GITDIR SD_GITDIR SGM_GITDIR KDIFF_GITDIR BLIP_GITDIR ASSETS_GITDIR [DEST]"
what=${1:?$usage}
checkout=$(realpath "$(dirname "$0")/../..")

# extract GITDIR COMMIT SUBDIR: the tree of COMMIT in GITDIR written to $dest/SUBDIR.  A snapshot
# may leave out its largest files (sample images: stablediffusion's assets/, BLIP.gif); those are
# skipped with a note, the WebUI never reads them.
extract() {
    git --git-dir="$1" cat-file -e "$2^{commit}" 2>/dev/null || { echo "commit $2 not in $1" >&2; exit 1; }
    mkdir -p "$dest/$3"
    local tree absent=()
    tree=$(git --git-dir="$1" ls-tree -r "$2")  # "<mode> <type> <object>\t<path>" per file
    while IFS= read -r path; do
        [ -n "$path" ] || continue
        echo "note: $path is not in $1; skipped" >&2
        absent+=(":(exclude,literal)$path")
    done < <(grep -F -f <(awk '$2 == "blob" {print $3}' <<<"$tree" | git --git-dir="$1" cat-file --batch-check \
                             | awk '$2 == "missing" {print $1}') <<<"$tree" | cut -f2- || true)
    # git still names each excluded absent file on stderr (and succeeds): keep only other messages
    git --git-dir="$1" archive "$2" -- . "${absent[@]}" 2> >(grep -v '^error: invalid object' >&2) \
        | tar -x -C "$dest/$3"
}

outside() {
    case "$(realpath -m "$dest")" in "$checkout"*) echo "DEST must be outside the checkout" >&2; exit 2;; esac
}

case "$what" in
forge)
    [ $# -ge 4 ] || { echo "$usage" >&2; exit 2; }
    dest=${5:-$HOME/.cache/likeness/forge}
    outside
    extract "$4" 6f7db241d2f8ba7457bac5ca9753331f0c266917 repositories/stable-diffusion-webui-assets  # ASSETS_COMMIT_HASH
    extract "$3" 84826248b49bb7ca754c73293299c4d4e23a548d repositories/huggingface_guess  # HUGGINGFACE_GUESS_HASH
    extract "$2" HEAD .
    ;;
a1111)
    [ $# -ge 7 ] || { echo "$usage" >&2; exit 2; }
    dest=${8:-$HOME/.cache/likeness/a1111}
    outside
    # the *_COMMIT_HASH defaults of AUTOMATIC1111's modules/launch_utils.py (prepare_environment)
    extract "$3" cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf repositories/stable-diffusion-stability-ai
    extract "$4" 45c443b316737a4ab6e40413d7794a7f5657c19f repositories/generative-models
    extract "$5" ab527a9a6d347f364e3d185ba6d714e22d80cb3c repositories/k-diffusion
    extract "$6" 48211a1594f1321b00f14c9f7a5b4813144b2fb9 repositories/BLIP
    extract "$7" 6f7db241d2f8ba7457bac5ca9753331f0c266917 repositories/stable-diffusion-webui-assets
    extract "$2" "${A1111_COMMIT:-82a973c0}" .  # upstream v1.10.1 master ("changelog")
    ;;
*)
    echo "$usage" >&2; exit 2;;
esac
echo "$dest"
