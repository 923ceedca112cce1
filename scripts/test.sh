#!/usr/bin/env bash
# The test command: set up .venv (as scripts/setup.sh does), then run pytest with any arguments given.
#
#   bash scripts/test.sh                    # or: make test
#   bash scripts/test.sh -m "not notebook"  # skip the notebook executions
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" -m pytest "$@"
