#!/usr/bin/env bash
# The main job in one command on a fresh Debian machine: set up, then run the demo.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npm run --silent demo -- "$@"
