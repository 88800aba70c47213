#!/usr/bin/env bash
# Command 2: set up (with the test tools), lint, type-check and run the test suite.
# `.ci/run` calls exactly this. Extra arguments go to pytest (e.g. -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup.sh
.venv/bin/ruff check --quiet visrec tests scripts
.venv/bin/mypy visrec
.venv/bin/python -m pytest "$@"
