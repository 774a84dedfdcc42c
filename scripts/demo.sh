#!/usr/bin/env bash
# The README's first command: install, then teach the bundled small model a new concept on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
likeness demo "$@"
