#!/usr/bin/env bash
# Command 2: set up (with the test tools), lint, type-check and run the test suite.
# `.ci/run` calls exactly this. Extra arguments go to pytest (e.g. -k ingest).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup.sh
# Debian's packages for the tools some tests run: Chromium and its driver (the gallery's browser test),
# openssl (a certificate for the fetcher's TLS test). Installed where we can (as root, with apt), else
# those tests are skipped and say why. Not installed here: kubectl (not in Debian; PyPI has only
# unofficial repackagings of the binary) and Docker's compose plugin; their tests skip without them.
need=()
command -v chromedriver >/dev/null || need+=(chromium chromium-driver)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
    >/dev/null || echo "could not install ${need[*]}: the tests that run them will be skipped" >&2
fi
.venv/bin/ruff check --quiet visrec tests scripts benchmarks
.venv/bin/mypy visrec tests benchmarks
# The suite writes real stores, models and snapshots under the temporary folder (docs/reliability.md,
# the suite's disk): say so up front when the disk is nearly full, not as 200 failed tests.
free_mb=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 3072 ]; then
  echo "warning: ${free_mb} MiB free under ${TMPDIR:-/tmp}; the tests need about 3 GiB and will fail for want of it" >&2
fi
# Two workers (pytest-xdist; fewer on a 1-CPU machine): the suite runs real services, processes and
# models, and waits on them as much as it computes; each worker trains the session's tiny model once.
.venv/bin/python -m pytest -n auto --maxprocesses 2 "$@"
