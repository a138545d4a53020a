#!/usr/bin/env bash
# Opt-in integration tests against a real ComfyUI checkout: a headless server (tests/integration/test_comfyui_server.py)
# and its real frontend in headless Chromium (tests/integration/test_browser.py).
#
#   COMFYUI_PATH=/path/to/ComfyUI scripts/comfyui_integration.sh [extra pytest arguments]
#
# Prepares, into this project's .venv: ComfyUI's requirements.txt minus torch/torchvision/torchaudio (the venv's torch
# is kept) plus `requests` (imported by ComfyUI's server, missing from its requirements). Then `npm ci` for
# playwright-core in tests/integration/browser/ (it drives Debian's /usr/bin/chromium; no browser is downloaded).
# Set SKIP_INSTALL=1 to skip the installs. Verified with ComfyUI 0.3.64 (commit a125cd84).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout (e.g. 0.3.64)}"
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
export COMFYUI_PATH
[ -f "$COMFYUI_PATH/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: not a ComfyUI checkout" >&2; exit 2; }

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    echo "[comfyui] installing ComfyUI's requirements (except torch, torchvision, torchaudio) into $VENV"
    REQS="$(mktemp)"
    trap 'rm -f "$REQS"' EXIT
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$' "$COMFYUI_PATH/requirements.txt" > "$REQS"
    echo "requests" >> "$REQS"
    "$PY" -m pip install --quiet -r "$REQS"
    if command -v npm > /dev/null; then
        echo "[comfyui] npm ci (playwright-core) in tests/integration/browser"
        (cd tests/integration/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
    else
        echo "[comfyui] npm not found: the browser test will be skipped"
    fi
fi

export COMFYUI_PYTHON="${COMFYUI_PYTHON:-$PY}"
exec "$PY" -m pytest -m "comfyui or browser" tests/integration "$@"
