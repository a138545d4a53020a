#!/usr/bin/env bash
# Opt-in integration tests against a real ComfyUI checkout: a headless server (tests/integration/test_comfyui_server.py),
# the adapter inside it (tests/integration/test_adapter_in_comfyui.py) and its real frontend in headless Chromium
# (tests/integration/test_browser.py), with each frontend named in THINKDIFF_FRONTENDS.
#
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/comfyui_integration.sh [extra pytest arguments]
#
# Each ComfyUI gets its own venv, .venv-comfyui-<version>[-<git commit>] in this checkout (COMFYUI_VENV overrides),
# never the project's .venv: torch==2.14.1 and torchvision==0.29.1, ComfyUI's requirements.txt minus
# torch/torchvision/torchaudio, `requests` (imported by ComfyUI's server, missing from its requirements),
# torchaudio==2.11.1 without dependencies (ComfyUI 0.33 imports it at start-up; it sits beside torch 2.14.1), this
# pack's requirements.txt and pytest. It is installed again only when one of those lists changes. The tests and the
# server both run on that venv's python; the pack is loaded from custom_nodes (a symlink to this checkout).
# THINKDIFF_FRONTENDS (default "1.27.10 1.49.6 1.58.1"): the frontend packages the browser test serves through
# --front-end-root, fetched from PyPI (pip download) into .cache/comfyui-frontends/ when missing; "installed" means
# the one ComfyUI's requirements installed. `npm ci` installs playwright-core in tests/integration/browser/ (it drives
# Debian's /usr/bin/chromium; no browser is downloaded). SKIP_INSTALL=1 skips every install and download.
# Verified with ComfyUI 0.3.64 (commit a125cd84) and 0.33.0 (commit 783545f6).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout (e.g. 0.3.64 or 0.33.0)}"
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
export COMFYUI_PATH
[ -f "$COMFYUI_PATH/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: not a ComfyUI checkout" >&2; exit 2; }

VERSION="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFYUI_PATH/comfyui_version.py" 2> /dev/null || true)"
COMMIT=""
[ -e "$COMFYUI_PATH/.git" ] && COMMIT="$(git -C "$COMFYUI_PATH" rev-parse --short=8 HEAD 2> /dev/null || true)"
COMFY_ID="${VERSION:-unknown}${COMMIT:+-$COMMIT}"
VENV="${COMFYUI_VENV:-$ROOT/.venv-comfyui-$COMFY_ID}"
PYTHON_BIN="${PYTHON:-python3}"
PINS=(torch==2.14.1 torchvision==0.29.1)
TORCHAUDIO=torchaudio==2.11.1
FRONTEND_CACHE="${THINKDIFF_FRONTEND_CACHE:-$ROOT/.cache/comfyui-frontends}"
export THINKDIFF_FRONTENDS="${THINKDIFF_FRONTENDS:-1.27.10 1.49.6 1.58.1}" THINKDIFF_FRONTEND_CACHE="$FRONTEND_CACHE"
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[comfyui] creating $VENV for ComfyUI $COMFY_ID"
        "$PYTHON_BIN" -m venv "$VENV"
    fi
    STAMP="$VENV/.thinkdiff-comfyui-requirements"
    WANT="$( (echo "${PINS[*]} $TORCHAUDIO"; cat "$COMFYUI_PATH/requirements.txt" "$ROOT/requirements.txt") | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$STAMP" 2> /dev/null)" != "$WANT" ]; then
        echo "[comfyui] installing ${PINS[*]}, ComfyUI's requirements (except torch, torchvision, torchaudio), $TORCHAUDIO and this pack's requirements into $VENV"
        REQS="$(mktemp)" CONSTRAINTS="$(mktemp)"
        trap 'rm -f "$REQS" "$CONSTRAINTS"' EXIT
        printf '%s\n' "${PINS[@]}" > "$CONSTRAINTS" # nothing below may replace this torch
        grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$' "$COMFYUI_PATH/requirements.txt" > "$REQS"
        printf '%s\n' requests "pytest>=8" >> "$REQS"
        quiet_pip install --quiet --upgrade pip
        quiet_pip install --quiet "${PINS[@]}"
        quiet_pip install --quiet -c "$CONSTRAINTS" -r "$REQS"
        quiet_pip install --quiet --no-deps "$TORCHAUDIO"
        quiet_pip install --quiet -c "$CONSTRAINTS" -r "$ROOT/requirements.txt"
        rm -f "$REQS" "$CONSTRAINTS" # here too: the exec at the end replaces this shell, and its EXIT trap with it
        trap - EXIT
        echo "$WANT" > "$STAMP"
    fi
    for version in $THINKDIFF_FRONTENDS; do
        [ "$version" = installed ] && continue
        if [ ! -f "$FRONTEND_CACHE/$version/comfyui_frontend_package/static/index.html" ]; then
            echo "[comfyui] fetching comfyui-frontend-package==$version into $FRONTEND_CACHE/$version"
            mkdir -p "$FRONTEND_CACHE/wheels"
            quiet_pip download --quiet --no-deps "comfyui-frontend-package==$version" -d "$FRONTEND_CACHE/wheels"
            rm -rf "$FRONTEND_CACHE/$version.tmp"
            "$VENV/bin/python" -m zipfile -e "$FRONTEND_CACHE"/wheels/comfyui_frontend_package-"$version"-*.whl "$FRONTEND_CACHE/$version.tmp"
            mv "$FRONTEND_CACHE/$version.tmp" "$FRONTEND_CACHE/$version"
        fi
    done
    if command -v npm > /dev/null; then
        echo "[comfyui] npm ci (playwright-core) in tests/integration/browser"
        (cd tests/integration/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
    else
        echo "[comfyui] npm not found: the browser test will be skipped"
    fi
fi
[ -x "$VENV/bin/python" ] || { echo "$VENV is missing: run once without SKIP_INSTALL=1" >&2; exit 2; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export COMFYUI_PYTHON="${COMFYUI_PYTHON:-$VENV/bin/python}" THINKDIFF_COMFYUI_ID="$COMFY_ID"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # thinkdiff_core for the tests' stand-in builders
echo "[comfyui] ComfyUI $COMFY_ID at $COMFYUI_PATH, python $COMFYUI_PYTHON, frontends: $THINKDIFF_FRONTENDS"
exec "$VENV/bin/python" -m pytest -m "comfyui or browser" tests/integration "$@"
