#!/usr/bin/env bash
# Creates .venv (once), installs requirements-dev.txt into it and the checkout itself in editable mode (`pip install
# -e .`: thinkdiff_core and the training scripts import from anywhere, with no sys.path edits); re-installs only when
# a requirements file or pyproject.toml changes.
# Sourced by scripts/demo.sh and scripts/test.sh, so each of them works on a fresh clone by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THINKDIFF_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.thinkdiff-requirements"
WANT="$( (echo "$ROOT"; cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing requirements-dev.txt into $VENV (the first time takes a few minutes)"
    # pip's notes about this machine's local wheel folders are noise; real errors still fail the script.
    "$VENV/bin/python" -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-dev.txt" 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT" 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY="$VENV/bin/python"
