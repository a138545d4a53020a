#!/usr/bin/env bash
# Creates .venv (once), installs requirements-dev.txt into it and the checkout itself in editable mode (`pip install
# -e .`: thinkdiff_core and the training scripts import from anywhere, with no sys.path edits); re-installs only when
# a requirements file or pyproject.toml changes.
# THINKDIFF_TRANSFORMERS=X.Y.Z (optional): the same, with transformers==X.Y.Z in place of requirements-dev.txt's pin,
# in a venv of its own (.venv-transformers-X.Y.Z), so that one checkout tests several transformers versions side by
# side (.ci/run runs the declared floor and the pinned newest). THINKDIFF_VENV overrides the venv's path.
# Sourced by scripts/demo.sh and scripts/test.sh, so each of them works on a fresh clone by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRANSFORMERS_PIN="${THINKDIFF_TRANSFORMERS:-}"
if [ -n "$TRANSFORMERS_PIN" ] && ! [[ "$TRANSFORMERS_PIN" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
    echo "[setup] THINKDIFF_TRANSFORMERS='$TRANSFORMERS_PIN' is not a release number: set it like THINKDIFF_TRANSFORMERS=4.57.6, or unset it for requirements-dev.txt's version" >&2
    exit 2
fi
VENV="${THINKDIFF_VENV:-$ROOT/.venv${TRANSFORMERS_PIN:+-transformers-$TRANSFORMERS_PIN}}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.thinkdiff-requirements"
WANT="$( (echo "$ROOT transformers=${TRANSFORMERS_PIN:-pinned}"; cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    REQUIREMENTS="$ROOT/requirements-dev.txt"
    if [ -n "$TRANSFORMERS_PIN" ]; then
        # requirements-dev.txt with its transformers pin replaced (requirements.txt's floor still applies).
        REQUIREMENTS="$VENV/requirements-transformers-$TRANSFORMERS_PIN.txt"
        sed -e '/^transformers==/d' -e "s#^-r requirements.txt#-r $ROOT/requirements.txt#" "$ROOT/requirements-dev.txt" >"$REQUIREMENTS"
        echo "transformers==$TRANSFORMERS_PIN" >>"$REQUIREMENTS"
    fi
    echo "[setup] installing ${REQUIREMENTS#"$ROOT/"} into $VENV (the first time takes a few minutes)"
    # pip's notes about this machine's local wheel folders are noise; real errors still fail the script.
    "$VENV/bin/python" -m pip install --quiet --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS" 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT" 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$WANT" >"$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY="$VENV/bin/python"
