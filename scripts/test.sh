#!/usr/bin/env bash
# The test command: set up .venv (as scripts/setup.sh does), then run pytest with any arguments given,
# in two worker processes (pytest-xdist; tests/conftest.py groups the tests and shares what a session does
# once), each with half of the CPUs' threads.
#
#   bash scripts/test.sh                    # or: make test
#   bash scripts/test.sh -m "not notebook"  # skip the notebook executions
#   bash scripts/test.sh -n 0               # one process
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
cpus="$("$ROOT/.venv/bin/python" -c 'import os; print(len(os.sched_getaffinity(0)))')"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus > 3 ? cpus / 2 : 1 ))}"
exec "$ROOT/.venv/bin/python" -m pytest -n 2 --dist loadgroup "$@"
