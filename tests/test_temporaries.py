"""Temporary files that killed writers leave (`fs.replacing`'s `.NAME.XXXXXXXX.tmp`) are swept where it is
safe: the store's at the service's start, a snapshot folder's at the next snapshot into it, a feed's at
its next run; only the names visrec writes there, only those no live process holds. Real processes,
killed with SIGKILL, and a real `visrec serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.helpers import run_visrec
from tests.faults.served import serve, synced_store
from tests.test_snapshot import visrec
from visrec import archive
from visrec.artefact import Manifest
from visrec.fs import TEMP_GRACE_S, sweep_temporaries

WRITER = """
import sys, time
from pathlib import Path
from visrec.fs import replacing
with replacing(Path(sys.argv[1])) as f:
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


@contextmanager
def writing(path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process writing `path` through `fs.replacing`, stopped midway: (it, its temporary file)."""
    before = set(path.parent.glob(f".{path.name}.*.tmp"))
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert process.stdout and process.stdout.readline() == "writing\n"
        (temporary,) = set(path.parent.glob(f".{path.name}.*.tmp")) - before
        yield process, temporary
    finally:
        process.kill()
        process.wait()


def left_by_a_killed_writer(path: Path) -> Path:
    """The temporary file a writer of `path` killed with SIGKILL leaves, aged past the grace time (the
    sweep spares a new one: its writer may not have locked it yet)."""
    with writing(path) as (process, temporary):
        process.send_signal(signal.SIGKILL)
        process.wait()
    old = time.time() - 2 * TEMP_GRACE_S
    os.utime(temporary, (old, old))
    return temporary


def test_only_visrecs_names_that_nobody_holds_are_swept(tmp_path: Path) -> None:
    dead = left_by_a_killed_writer(tmp_path / "feed.jsonl")
    other = left_by_a_killed_writer(tmp_path / "notes.txt")  # not a name visrec writes here
    fresh = tmp_path / ".feed.jsonl.abcdefgh.tmp"
    fresh.write_text("a writer that has not locked it yet")
    users = [
        tmp_path / ".feed.jsonl.tmp",
        tmp_path / ".feed.jsonl.backup-1.tmp",
        tmp_path / "feed.jsonl.x1234567.tmp",
    ]
    for path in users:
        path.write_text("mine")
        os.utime(path, (0, 0))
    with writing(tmp_path / "feed.jsonl") as (_, alive):
        os.utime(alive, (0, 0))  # old, but its writer holds it
        assert sweep_temporaries(tmp_path, r"feed\.jsonl") == [dead.name]
        assert alive.exists()
    assert other.exists() and fresh.exists() and all(p.exists() for p in users)


def test_the_services_start_sweeps_the_stores_temporaries(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=3)
    root = settings.qdrant.path
    dead = [
        left_by_a_killed_writer(root / name)
        for name in ("products.alias", "products__v1.json", "products__v2.current", "products.owner.json")
    ]
    kept = [
        left_by_a_killed_writer(root / "other.alias"),
        left_by_a_killed_writer(root / "products.alias.bak"),
    ]
    with serve(settings, tmp_path / "serve.log"):
        assert not [p for p in dead if p.exists()]
    assert all(p.exists() for p in kept)


def test_a_snapshot_sweeps_its_folders_dead_checksum_temporaries_only(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=3)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    dead = left_by_a_killed_writer(snaps / "products-20261207T023000000000Z.visrec.tar.sha256")
    theirs = snaps / "products-20261207T023100000000Z.visrec.tar.sha256"
    with writing(theirs) as (_, alive):  # another snapshot, writing its checksum file now
        os.utime(alive, (0, 0))
        taken = visrec(settings, "snapshot", str(snaps))
        assert dead.name in taken["removed"] and not dead.exists()
        assert alive.exists() and alive.name not in taken["removed"]


def test_a_snapshots_checksum_file_is_written_after_its_archive(
    tmp_path: Path, artefact: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=3)
    seen: list[bool] = []
    real = archive.write_atomically

    def checking(path: Path, data: str | bytes) -> None:
        seen.append(path.with_name(path.name.removesuffix(".sha256")).is_file())
        real(path, data)

    monkeypatch.setattr(archive, "write_atomically", checking)
    from visrec.index import open_store
    from visrec.snapshot import CUT_ALONE, Cut, take, version_record

    with open_store(settings.qdrant) as store, store.open(store.live()) as index:
        take(
            index,
            tmp_path / "snaps",
            record=version_record(store, store.live()),
            cut=Cut(archive.now(), CUT_ALONE),
            engine="test",
            configured_model=settings.artefact,
        )
    assert seen == [True]


def test_a_feeds_next_run_sweeps_what_a_killed_run_left(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = synced_store(tmp_path, artefact[0], n=3)
    out = tmp_path / "feeds" / "feed.jsonl"
    out.parent.mkdir()
    dead = [left_by_a_killed_writer(out), left_by_a_killed_writer(out.with_name("feed.jsonl.state"))]
    other = left_by_a_killed_writer(out.with_name("other.jsonl"))
    done = run_visrec(settings, "neighbours", "--out", str(out), "-k", "2")
    assert done.returncode == 0, done.stderr
    assert not [p for p in dead if p.exists()] and other.exists()
