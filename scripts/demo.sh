#!/usr/bin/env bash
# Quick start 1: the ThinkDiff-LVLM graph, offline, on tiny stand-in models built locally. Writes demo_output/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m scripts.demo "$@"
