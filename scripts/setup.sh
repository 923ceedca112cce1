#!/usr/bin/env bash
# Make the project's virtual environment ready: .venv in the repository root, holding the package
# (editable) with its test and book extras and a Jupyter kernel named "kdbook".
#
#   bash scripts/setup.sh          # PYTHON=python3.12 bash scripts/setup.sh to pick the interpreter
#
# Creates .venv with $PYTHON (default python3) if it is missing or broken, and runs
# `pip install -e ".[test,book]"` only when pyproject.toml (or the Python version) changed since the
# last successful install: a stamp file in .venv holds their hash, so a second run takes a second.
# The same step downloads the wheels of Colab's widget versions (tests/colab_widgets.txt) into
# .venv/colab-widgets-wheels/, for tests/test_colab_widgets.py, which runs offline.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.kdbook-install-stamp"

if ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "setup: $PYTHON not found; install Python 3.9 or newer, or set PYTHON=/path/to/python3" >&2
        exit 1
    fi
    echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv --clear "$VENV"
fi

wanted="$("$VENV/bin/python" - "$ROOT/pyproject.toml" "$ROOT/tests/colab_widgets.txt" <<'PY'
import hashlib, sys
digest = hashlib.sha256(b"".join(open(path, "rb").read() for path in sys.argv[1:])).hexdigest()
print(f"{digest} python-{sys.version_info.major}.{sys.version_info.minor}")
PY
)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    echo "setup: $VENV is up to date with pyproject.toml"
    exit 0
fi

echo "setup: installing kdbook-utils with its test and book extras into $VENV (the first time downloads a few GB)"
start=$SECONDS
"$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test,book]"
"$VENV/bin/python" -m pip download --disable-pip-version-check --quiet --no-deps \
    --dest "$VENV/colab-widgets-wheels" -r "$ROOT/tests/colab_widgets.txt"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name kdbook --display-name "Python (kdbook)" >/dev/null
printf '%s\n' "$wanted" > "$STAMP"
echo "setup: done in $((SECONDS - start)) s"
