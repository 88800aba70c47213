"""The embedded store's own faults, under a real `visrec sync`: the engine failing to write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.helpers import check_index_matches_catalogue, figure, settings_env
from tests.helpers import MakeCatalogue, run_sync
from visrec.config import Settings
from visrec.errors import IndexUnavailable

REPO = Path(__file__).parents[2]
# `visrec ARGV` with file writes beyond LIMIT bytes failing with EFBIG (the file size limit; SIGXFSZ ignored
# so that the write fails instead of killing the process): what a full disk does to the engine's writes.
# (Writes through its memory maps, where it puts points, are not limited: those files are preallocated.)
FULL_DISK_CLI = """
import resource, signal, sys
import visrec.cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
visrec.cli.app(sys.argv[2:], prog_name="visrec")
"""


@pytest.mark.parametrize(
    ("existing", "limit"),
    [(False, 65536), (True, 1)],
    ids=["creating-the-collection", "opening-an-existing-store"],
)
def test_a_full_disk_in_a_sync_is_one_clear_error_and_a_rerun_completes(
    store: Settings, make_catalogue: MakeCatalogue, tmp_path: Path, existing: bool, limit: int
) -> None:
    """Fault: the engine cannot write (EFBIG, as ENOSPC on a full disk) during a sync: one that creates the
    collection (its WAL cannot be allocated), or one that adds products to an existing store (which the
    engine writes to on opening). visrec: every engine error goes through one translation; a folder whose
    creation failed counts as no collection. Checked: the CLI exits with IndexUnavailable's code and one
    line naming the store and "the disk is full", no traceback; once space is back, a rerun indexes every
    product exactly once."""
    if store.qdrant.url:
        pytest.skip("a fault of the embedded store's files; a server reports its own disk errors over HTTP")
    if existing:
        run_sync(make_catalogue(8), store)
    catalogue = make_catalogue(24)
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CLI, str(limit), "sync", str(catalogue), "--json"],
        cwd=REPO,
        env=settings_env(store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    figure("full disk/sync", {"existing": existing, "exit": done.returncode, "stderr": errors})
    assert done.returncode == IndexUnavailable.exit_code, done.stderr
    assert "Traceback" not in done.stderr
    assert len(errors) == 1 and errors[0].startswith("error: embedded store "), errors
    assert "the disk is full or the file size limit was reached" in errors[0]
    assert str(store.qdrant.path) in errors[0]

    summary = run_sync(catalogue, store)  # space is back: the rerun carries on
    assert summary.failed == 0
    assert check_index_matches_catalogue(store, catalogue, tmp_path) == (0, 0)
