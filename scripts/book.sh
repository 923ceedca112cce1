#!/usr/bin/env bash
# The main job: set up .venv, execute every notebook in notebooks/ top to bottom (preset quick unless
# KDBOOK_PRESET says otherwise), and build the Jupyter Book into kdbook/_build/html.
#
#   bash scripts/book.sh           # or: make book
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
PRESET="${KDBOOK_PRESET:-quick}"
start=$SECONDS

bash scripts/setup.sh

echo "book: executing notebooks/*.ipynb with preset $PRESET"
mkdir -p kdbook/lessons
# Executed copies of notebooks that no longer exist must not reach the book.
for copy in kdbook/lessons/*.ipynb; do
    [ -e "$copy" ] || continue
    [ -e "notebooks/$(basename "$copy")" ] || rm -f "$copy"
done
"$PY" scripts/execute_notebooks.py --out kdbook/lessons --preset "$PRESET"

echo "book: building the Jupyter Book"
# The instructors' page includes the recorded notebook times (kdbook_utils/results/timings.csv).
"$PY" -c "from kdbook_utils.lessons import write_timings_markdown as w; w('kdbook/_generated/times.md')"
"$PY" scripts/book_toc.py "$ROOT/kdbook/_build/_toc.yml"
"$ROOT/.venv/bin/jupyter-book" build kdbook --toc "$ROOT/kdbook/_build/_toc.yml"

index="$ROOT/kdbook/_build/html/index.html"
if [ ! -f "$index" ]; then
    echo "book: the build finished but $index is missing" >&2
    exit 1
fi
echo "book: done in $((SECONDS - start)) s. Open the book: $index"
