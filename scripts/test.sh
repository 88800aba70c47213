#!/usr/bin/env bash
# Command 2: set up (with the test tools), lint, type-check and run the test suite.
# `.ci/run` calls exactly this. Extra arguments go to pytest (e.g. -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup.sh
# The gallery's browser test drives Debian's Chromium; install it where we can (as root), else that
# test is skipped and says why.
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null || echo "could not install chromium: the browser test will be skipped" >&2
fi
.venv/bin/ruff check --quiet visrec tests scripts benchmarks
.venv/bin/mypy visrec tests benchmarks
.venv/bin/python -m pytest "$@"
