"""A snapshot beside a running service writes its archive in a process of its own (`snapshot.take_apart`):
that process killed (SIGKILL) midway, or out of room on the archive's disk, says one line, leaves the live
version as it was and nothing that the next snapshot trips over; the next one, taken while HTTP writes
flow, holds point by point what the live version held at its cut. Real `visrec serve`, real engine, real
signals; the archive's process is found as the service's child."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

from tests.faults.helpers import settings_env, spawn_visrec
from tests.faults.served import Served, serve, synced_store
from tests.test_snapshot import Readers, partial_written, visrec, wait_for
from visrec.archive import Archive
from visrec.artefact import Manifest
from visrec.config import Settings
from visrec.filters import Filters
from visrec.index import IndexPoint, open_index

WRITE_KEY = "snapshot-child-write-key"
PRODUCTS = 3000  # beside the 3 synced ones: a 12 MB archive, long enough to stop its writer midway
PRICE = 100_000  # the i-th write sets r{i}'s price to PRICE + i (never a price it had)


def written_store(root: Path, artefact: Path) -> Settings:
    """3 synced products, then `PRODUCTS` more written directly (random vectors, a synced product's
    payload under their own id, as benchmarks/ scale runs write them): each can be PATCHed."""
    settings = synced_store(root, artefact, n=3)
    rng = np.random.default_rng(0)
    with open_index(settings.qdrant) as index:
        template = index.payloads(["p0"])["p0"]
        dim = index.vectors(["p0"])["p0"].shape[1]
        for start in range(0, PRODUCTS, 1000):
            index.upsert(
                [
                    IndexPoint(
                        f"r{i}",
                        rng.standard_normal((1, dim), np.float32),
                        template | {"product_id": f"r{i}", "price": 20 + i},
                    )
                    for i in range(start, min(PRODUCTS, start + 1000))
                ]
            )
    return settings


def every_point(settings: Settings) -> dict[str, IndexPoint]:
    """What the live version holds, read here (no service runs)."""
    with open_index(settings.qdrant) as index:
        ids: list[str] = []
        after: str | None = None
        while True:
            page, after = index.browse(Filters(), 1000, after)
            ids += [product_id for product_id, _ in page]
            if after is None:
                return {p.product_id: p for p in index.points(ids)}


class Writes:
    """PATCHes r0, r1, r2, … in turn, each product once (price PRICE + i), recording when each write was
    acknowledged: which products a cut holds written is then a prefix of that order."""

    def __init__(self, served: Served) -> None:
        self.acknowledged: list[tuple[int, float]] = []
        self.acknowledged_at: list[datetime] = []  # the same, on the clock a snapshot's cut is read on
        self._client = httpx.Client(base_url=served.url, timeout=30, headers={"X-API-Key": WRITE_KEY})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(PRODUCTS):
            if self._stop.is_set():
                return
            if self._client.patch(f"/products/r{i}", json={"price": PRICE + i}).status_code == 200:
                self.acknowledged.append((i, time.monotonic()))
                self.acknowledged_at.append(datetime.now(UTC))

    def __enter__(self) -> Writes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()


def archive_process(service: int, timeout: float = 120) -> int:
    """The pid of the service's child writing an archive (`python -m visrec.snapshot`), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                if ppid == service and b"visrec.snapshot" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        time.sleep(0.01)
    raise AssertionError("no archive process appeared")


def process_state(pid: int) -> str:
    return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]


def stop_midway(pid: int, snaps: Path) -> None:
    """Let the process run in short slices, stopped between them, until it is stopped with a partial
    archive of more than 512 KiB written: then it is midway, whatever the machine's load."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: process_state(pid) in "Tt", timeout=10)
        if partial_written(snaps):
            assert not list(snaps.glob("*.tar")), "the archive was finished before it could be stopped"
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.003)
    raise AssertionError("the archive process wrote no partial archive")


def one_line(log: Path) -> str:
    """The command's one error line: the last of its output, no traceback."""
    text = log.read_text()
    lines = text.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in text, text
    return errors[0]


@contextlib.contextmanager
def tiny_disk(folder: Path) -> Iterator[Path | None]:
    """A 1 MiB tmpfs at `folder` (root only: None where it cannot be mounted)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=False)
    try:
        yield folder if mounted.returncode == 0 else None
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def test_the_archive_process_killed_or_out_of_room_leaves_nothing_and_the_next_holds_the_cut(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = written_store(tmp_path, artefact[0])
    before = every_point(settings)
    copies = settings.qdrant.path
    snaps = tmp_path / "snaps"
    env = settings_env(settings)
    with (
        serve(settings, tmp_path / "serve.log", env={"VISREC_API__WRITE_KEY": WRITE_KEY}) as served,
        Readers(served) as readers,
    ):
        # Out of room where the archive goes: the process's own line, nothing left there, the copy gone.
        with tiny_disk(tmp_path / "tiny") as tiny:
            if tiny is not None:
                full = spawn_visrec(env, tmp_path / "full.log", tmp_path, "snapshot", str(tiny / "snaps"))
                assert full.wait(120) == 2
                line = one_line(tmp_path / "full.log")
                assert "not snapshotted: cannot write the snapshot into" in line, line
                assert "No space left on device" in line and "the live version is untouched" in line
                assert list((tiny / "snaps").iterdir()) == []
                assert not list(copies.glob("products__v1.g*"))

        # Killed midway (SIGKILL while it is stopped with a partial archive written).
        command = spawn_visrec(env, tmp_path / "killed.log", tmp_path, "snapshot", str(snaps))
        child = archive_process(served.process.pid)
        stop_midway(child, snaps)
        os.kill(child, signal.SIGKILL)
        assert command.wait(120) == 1
        line = one_line(tmp_path / "killed.log")
        assert "not snapshotted: the process writing the archive was killed (SIGKILL)" in line, line
        assert "the live version is untouched" in line
        assert not list(copies.glob("products__v1.g*"))  # the service removed its copy
        assert not list(snaps.glob("*.tar")) and list(snaps.glob(".*.partial"))  # a partial nobody holds

        # The next, while HTTP writes flow: it sweeps that partial and leaves only its two named files.
        with Writes(served) as writes:
            wait_for(lambda: len(writes.acknowledged) >= 20)
            began = time.monotonic()
            taken = visrec(settings, "snapshot", str(snaps))
            acknowledged_after = len(writes.acknowledged)
            wait_for(lambda: len(writes.acknowledged) >= acknowledged_after + 10)  # writes go on after it
        assert [n for n in taken["removed"] if n.endswith(".partial")], taken["removed"]
        name = Path(taken["snapshot"]).name
        assert sorted(p.name for p in snaps.iterdir()) == [name, name + ".sha256"]
        assert not list(copies.glob("products__v1.g*"))
        assert taken["cut"]["writes_held_s"] < 2 and taken["process_max_rss_mib"] is not None
    assert set(readers.statuses) == {200}, readers.statuses
    after = every_point(settings)  # the live version now: every acknowledged write in it
    assert after.keys() == before.keys()
    assert all(after[f"r{i}"].payload["price"] == PRICE + i for i, _ in writes.acknowledged)

    held = {p.product_id: p for chunk in Archive.open(Path(taken["snapshot"])).chunks() for p in chunk}
    assert held.keys() == before.keys() and taken["points"] == len(before)
    written = sorted(
        int(p[1:]) for p, point in held.items() if point.payload.get("price") == PRICE + int(p[1:])
    )
    cut = len(written)
    assert written == list(range(cut)), "the writes a snapshot holds are those up to its cut"
    assert all(i < cut for i, at in writes.acknowledged if at < began)  # acknowledged before it began: in it
    # Acknowledged before its cut (the moment its writer held writes to settle the copy): in it too.
    cut_at = datetime.fromisoformat(taken["cut"]["at"])
    late = [i for (i, _), at in zip(writes.acknowledged, writes.acknowledged_at, strict=True) if at < cut_at]
    assert all(i < cut for i in late), (cut, max(late))
    assert any(i >= cut for i, _ in writes.acknowledged)  # and the writes after its cut are not
    for product_id, point in held.items():  # point by point: as the live version held it at the cut
        at_cut = after[product_id] if product_id in {f"r{i}" for i in written} else before[product_id]
        np.testing.assert_array_equal(point.photo_vectors, at_cut.photo_vectors)
        assert point.payload == at_cut.payload, product_id


def ended(pid: int) -> bool:
    """Whether the process is gone (or a zombie nobody has reaped yet)."""
    try:
        return process_state(pid) in "ZX"
    except OSError:
        return True


def test_the_archive_process_ends_with_a_killed_service(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    """The service killed (SIGKILL) while its archive's process is midway: that process ends at once (its
    stdin closed); the next start sweeps the copy, the next snapshot the partial archive left."""
    settings = written_store(tmp_path, artefact[0])
    copies = settings.qdrant.path
    snaps = tmp_path / "snaps"
    env = settings_env(settings)
    with serve(settings, tmp_path / "serve.log") as served:
        command = spawn_visrec(env, tmp_path / "handed.log", tmp_path, "snapshot", str(snaps))
        child = archive_process(served.process.pid)
        stop_midway(child, snaps)
        served.process.send_signal(signal.SIGKILL)
        assert served.process.wait(30) == -signal.SIGKILL
        os.kill(child, signal.SIGCONT)  # it goes on only to find its stdin closed
        wait_for(lambda: ended(child), timeout=30)
        assert command.wait(60) == 4
    # No archive: a partial nobody holds (or none, if it found its answers' pipe closed first and removed it).
    assert not list(snaps.glob("*.tar"))
    assert list(copies.glob("products__v1.g*"))  # the copy it was reading, until the next start
    with serve(settings, tmp_path / "serve2.log"):
        assert not list(copies.glob("products__v1.g*"))
        taken = visrec(settings, "snapshot", str(snaps))
        name = Path(taken["snapshot"]).name
        assert sorted(p.name for p in snaps.iterdir()) == [name, name + ".sha256"]
        assert taken["points"] == PRODUCTS + 3
