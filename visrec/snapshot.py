"""Backups of a live store: a snapshot of the live collection version into a self-contained archive
(`visrec.archive`), and a restore that makes one the live version again (`visrec snapshot`, `visrec
restore`; docs/operations.md#backups-snapshot-and-restore).

A snapshot is read from a version nobody writes to while it is read: on the embedded store beside a
service, a copy of the live folder the writer takes beside writes and settles with them held
(`Writer.snapshot`: the last flush and what changed during the copy; reads go on); with no service,
the store this command opened (the engine admits no other process); on a server, the live collection
itself, scrolled while others may write (no cut: the docs say what that guarantees). The points go out
page by page; the cut, the version and alias record and the model that built it (its manifest and
weights checksum, with `--with-model` the artefact itself) go with them.

Beside a service, the archive is written by a process of its own (`take_apart`, `python -m
visrec.snapshot`): the copy is opened there (nobody else writes it) and read into the archive at a lower
priority, so the service's requests keep its GIL and most of the CPU; the service waits for it, passes
its progress on, and removes the copy whatever becomes of it. The process ends with the service (its
stdin closes): what it leaves, a partial archive nobody holds and the copy nothing names, the next
snapshot and the service's next start sweep.

A restore builds a new version from the archive beside the live one and switches the alias to it, as a
reindex does, so that `visrec rollback` undoes it. Before anything is written it refuses a damaged
archive, a model that is not here (found by its checksum, wherever it lies) and vectors that do not fit
that model; before the switch, one that would drop products written since the snapshot, unless forced.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from visrec import __version__
from visrec.archive import (
    CHUNK,
    FORMAT,
    FORMAT_VERSION,
    MODEL_DIR,
    Archive,
    ArchiveWriter,
    SnapshotDamaged,
    keep_last,
    now,
    snapshot_name,
    sweep_partials,
)
from visrec.child import PARENT_GONE, ChildProcess, answer_channel, how_it_ended, read_request
from visrec.config import QdrantSettings
from visrec.errors import ModelError, OutputUnwritable, VisrecError, WritesWouldBeLost
from visrec.filters import Filters
from visrec.index import IndexPoint, Store, VectorIndex
from visrec.manifest import MANIFEST, Manifest, artefact_for, read_manifest, sha256_file
from visrec.versions import differing, differing_from

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# What each way of reading the live version guarantees (the header's `cut.holds`).
CUT_COPY = "every write acknowledged before the cut, nothing after it (a copy taken with writes held)"
CUT_ALONE = "every write made before the snapshot began (this command held the store: no other writer)"
CUT_SCROLL = (
    "every write acknowledged before the snapshot began, unless a later write changed that product; a "
    "write made during it may or may not be in it (a server collection read while others may write)"
)


@dataclass(frozen=True)
class Cut:
    """The moment a snapshot's content was fixed, what that guarantees, and how long writes waited."""

    at: datetime
    holds: str
    writes_held_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "holds": self.holds, "writes_held_s": round(self.writes_held_s, 4)}


def version_record(store: Store, version: str) -> dict[str, Any]:
    """The alias and version a snapshot is of, and the versions beside it then."""
    return {"name": store.name, "version": version, "live": store.live(), "versions": store.versions()}


def take(
    index: VectorIndex,
    out: Path,
    *,
    record: dict[str, Any],
    cut: Cut,
    engine: str,
    configured_model: Path,
    with_model: bool = False,
    keep: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a snapshot of `index` (a version nobody writes to meanwhile, or a server collection: `cut`
    says which) into the folder `out`; `record`: its alias/version record (`version_record`);
    `configured_model`: the artefact to look in for the model that built it, besides the one recorded.
    Keeps the last `keep` snapshots of this collection there. Returns what the command prints."""
    started = time.perf_counter()
    swept = sweep_partials(out) if out.is_dir() else []
    metadata = index.metadata() if index.exists() else {}
    model, artefact, problem = _model_record(metadata, configured_model)
    if with_model and artefact is None:
        raise ModelError(f"not snapshotted: --with-model, but {problem}")
    total = index.count() if index.exists() else 0
    name = snapshot_name(record["name"], cut.at)
    try:
        path, size, digest, points, photos = _write(
            index, out, name, total, record, cut, engine, metadata, model, artefact, with_model, progress
        )
    except OSError as exc:  # the archive's disk (the store's reads are the engine's, mapped to its errors)
        raise OutputUnwritable(
            f"not snapshotted: cannot write the snapshot into {out}: {exc.strerror or exc}; the live "
            "version is untouched"
        ) from None
    removed = keep_last(out, record["name"], keep) if keep else []
    log.info("snapshot of %s: %s (%d points, %d bytes)", record["version"], path, points, size)
    return {
        "snapshot": str(path),
        "checksum_file": str(path) + ".sha256",
        "sha256": digest,
        "bytes": size,
        "version": record["version"],
        "points": points,
        "photos": photos,
        "model_version": metadata.get("model_version"),
        "model_included": bool(with_model),
        "model_problem": problem,
        "cut": cut.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
        "removed": removed + swept,
    }


def _write(
    index: VectorIndex,
    out: Path,
    name: str,
    total: int,
    record: dict[str, Any],
    cut: Cut,
    engine: str,
    metadata: dict[str, str],
    model: dict[str, Any] | None,
    artefact: Path | None,
    with_model: bool,
    progress: Progress | None,
) -> tuple[Path, int, str, int, int]:
    """The archive itself (`take`): its path, bytes, sha256, points and photos. A partial one is removed
    if this raises."""
    with ArchiveWriter(out, name) as writer:
        after: str | None = None
        while total:
            page, after = index.browse(Filters(), CHUNK, after)
            vectors = index.vectors([product_id for product_id, _ in page])
            # A product deleted between the two reads (a server read while others write) is left out.
            writer.add_points([IndexPoint(p, vectors[p], payload) for p, payload in page if p in vectors])
            _tell(progress, "snapshot", writer.points, total)
            if after is None:
                break
        if with_model and artefact is not None and model is not None:
            files = [artefact / MANIFEST, artefact / model["manifest"]["weights_file"]]
            model["included"] = [f"{MODEL_DIR}/{f.name}" for f in files]
            for f in files:
                writer.add_file(f"{MODEL_DIR}/{f.name}", f)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": now().isoformat(),
            "cut": cut.to_dict(),
            "visrec_version": __version__,
            "engine": engine,
            "collection": record,
            "metadata": metadata,
            "layout": index.layout() if index.exists() else None,
            "dim": writer.dim
            or (model["manifest"]["embedding_dim"] if model and model["manifest"] else None),
            "points": writer.points,
            "photos": writer.photos,
            "model": model,
        }
        path, size, digest = writer.finish(header)
    return path, size, digest, writer.points, writer.photos


NICENESS = 10  # the archive's process gives the CPU to the service's requests and writes first


class ArchiveFailed(VisrecError):
    """The process writing a snapshot's archive failed (`take_apart`): its one line and exit code, as the
    same failure says them when the archive is written in the command's own process."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def take_apart(
    folder: Path,
    collection: str,
    qdrant: QdrantSettings,
    out: Path,
    *,
    record: dict[str, Any],
    cut: Cut,
    engine: str,
    configured_model: Path,
    with_model: bool = False,
    keep: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`take` of the embedded collection version `collection` held in `folder` (a settled copy nobody
    writes to), run in a process of its own at a lower priority (`python -m visrec.snapshot`): this one
    waits, passing its progress on. The archive is the one `take` writes here. Raises `ArchiveFailed`
    with the child's own line (or how it ended, if it said none); the folder is the caller's to remove."""
    request = {
        "folder": str(folder),
        "collection": collection,
        "qdrant": qdrant.model_dump(mode="json"),
        "out": str(out),
        "record": record,
        "cut": cut.to_dict(),
        "engine": engine,
        "configured_model": str(configured_model),
        "with_model": with_model,
        "keep": keep,
    }
    # The child ends with this process (`visrec.child`): a killed service leaves no archive being
    # written from a copy it no longer owns.
    final: dict[str, Any] = {}
    with ChildProcess("visrec.snapshot", request) as child:
        log.info("snapshot of %s: the archive is written by process %d", record["version"], child.pid)
        for message in child.messages():
            if "progress" in message:
                _tell(progress, *message["progress"])
            else:
                final = message
        code = child.wait()
    if "result" in final and code == 0:
        return dict(final["result"])
    if "error" in final:
        raise ArchiveFailed(str(final["error"]), int(final.get("exit_code", 1)))
    raise ArchiveFailed(
        f"not snapshotted: the process writing the archive {how_it_ended(code)} before it finished; the "
        "live version is untouched and no snapshot was written: run it again"
    )


def _child() -> int:
    """`python -m visrec.snapshot`: `take_apart`'s process. Reads its request (one JSON line) on stdin,
    writes the archive from the copy, sends `{"progress": [stage, done, total]}` lines and then
    `{"result": …}` or `{"error": line, "exit_code": n}` on stdout; stops when its stdin closes."""
    answers = answer_channel()
    request = read_request()
    if request is None:
        return PARENT_GONE
    os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="snapshot process: %(levelname)s %(message)s")

    def send(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")

    from visrec.index.edge import EdgeIndex  # the embedded engine: only a service's copies come here

    folder = Path(request["folder"])
    try:
        qdrant = QdrantSettings.model_validate(request["qdrant"])
        cut = Cut(
            datetime.fromisoformat(request["cut"]["at"]),
            request["cut"]["holds"],
            request["cut"]["writes_held_s"],
        )
        with EdgeIndex(folder.parent, request["collection"], qdrant, folder=folder) as index:
            result = take(
                index,
                Path(request["out"]),
                record=request["record"],
                cut=cut,
                engine=request["engine"],
                configured_model=Path(request["configured_model"]),
                with_model=request["with_model"],
                keep=request["keep"],
                progress=lambda stage, done, total: send({"progress": [stage, done, total]}),
            )
    except VisrecError as exc:
        send({"error": str(exc), "exit_code": exc.exit_code})
        return 0
    except Exception as exc:  # a bug: its traceback in the service's log, its line to the command
        traceback.print_exc()
        send({"error": f"the snapshot's process failed: {type(exc).__name__}: {exc}", "exit_code": 1})
        return 0
    result["process_max_rss_mib"] = _peak_rss_mib()
    send({"result": result})
    return 0


def _peak_rss_mib() -> int | None:
    """This process's peak resident memory (VmHWM: its own since exec, unlike getrusage's ru_maxrss,
    which keeps the forking service's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _model_record(
    metadata: Mapping[str, str], configured: Path
) -> tuple[dict[str, Any] | None, Path | None, str | None]:
    """What the snapshot says of the model that built the version: its version, weights checksum and
    manifest, found where the version records it or at `configured`; the artefact's folder; and why
    the manifest could not be read, if it could not (the snapshot then names the model version alone)."""
    wanted = metadata.get("model_version")
    if wanted is None:
        return None, None, "the collection records no model"
    try:
        artefact = artefact_for(dict(metadata), configured)
        manifest = read_manifest(artefact)
    except ModelError as exc:
        unread: dict[str, Any] = {"model_version": wanted, "weights_sha256": None, "manifest": None}
        return unread | {"included": []}, None, str(exc)
    record: dict[str, Any] = {
        "model_version": manifest.model_version,
        "weights_sha256": manifest.weights_sha256,
        "manifest": manifest.model_dump(mode="json"),
        "included": [],
    }
    return record, artefact, None


@dataclass(frozen=True)
class Serving:
    """A service that serves and writes into the live version while a restore builds the next one: the
    switch is made, and served, with its writes held; what they changed meanwhile is compared again."""

    live: VectorIndex | None  # the handle it writes into (None: it serves no version yet)
    writes_held: Callable[[], AbstractContextManager[object]]
    switched: Callable[[], None]  # serve the switched version, or raise: called with writes still held
    version: Callable[[str], AbstractContextManager[VectorIndex]]  # the service's handle on a version
    holds: Callable[[str], bool] = lambda place: False  # whether it still holds a handle on a place


def restore(
    archive: Archive,
    store: Store,
    configured_model: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    held: Mapping[str, VectorIndex] | None = None,
    serving: Serving | None = None,
) -> dict[str, Any]:
    """Make the snapshot `archive` the live version: built as the version above the live one (one left
    by an earlier restore or reindex there is rebuilt), then switched to. Raises before writing
    anything `ModelError` when its model is not here (looked for by checksum beside
    `configured_model` and where the snapshot recorded it; a model the snapshot carries is written
    beside `configured_model`) and `SnapshotDamaged` when its vectors do not fit that model; before the
    switch, `WritesWouldBeLost` when the live version holds products written since the snapshot (unless
    `force`). `held`: versions this process has open; `serving`: the service writing meanwhile."""
    started = time.perf_counter()
    header = archive.header
    artefact = find_model(archive, configured_model)
    manifest = read_manifest(artefact) if artefact else None
    dim = header.dim
    if manifest is not None and dim is not None and dim != manifest.embedding_dim:
        raise SnapshotDamaged(
            f"not restored: {archive.path} holds {dim}-d vectors, but its model {manifest.model_version} "
            f"makes {manifest.embedding_dim}-d ones; nothing was changed"
        )
    if dim is None:
        raise SnapshotDamaged(f"not restored: {archive.path} names neither a dimension nor a model")
    live = store.live()
    first = live not in store.versions()  # nothing built yet: the snapshot becomes the first version
    target = live if first else store.version(store.generation(live) + 1)
    metadata = {
        **header.metadata,
        "restored_from": archive.path.name,
        "snapshot_cut": header.cut.get("at", ""),
    }
    if artefact is not None:
        metadata["artefact"] = str(artefact.resolve())
    if first:
        live_version: AbstractContextManager[VectorIndex | None] = nullcontext(None)
    elif serving and serving.live is not None:
        live_version = nullcontext(serving.live)
    else:
        live_version = store.opened(live, held or {})
    with live_version as live_index:
        # From before the comparison: what a service writes meanwhile is compared again before the switch.
        changes = live_index.watch() if live_index is not None else None
        try:
            dropped = differing_from(live_index, archive.records(), archive.payloads) if live_index else set()
            _refuse_drops(dropped, force, live)
            began = False
            try:
                with serving.version(target) if serving else store.opened(target, held or {}) as index:
                    began = True
                    points = _build(archive, index, dim, metadata, progress)
                    optimizing = time.perf_counter()
                    if points:  # a service's handle is optimized apart: the GIL stays free for its requests
                        index.optimize(apart=serving is not None)
                    optimize_s = time.perf_counter() - optimizing
                    with serving.writes_held() if serving else nullcontext():
                        meanwhile = changes.take() if changes else set()
                        if meanwhile and live_index is not None:
                            dropped = (dropped - meanwhile) | differing(live_index, index, meanwhile)
                            _refuse_drops(dropped, force, live)
                        _switch(store, live, target, serving)
            except BaseException:
                if began:
                    _discard(store, target, held or {}, serving)
                raise
        finally:
            if changes:
                changes.close()
    log.info("%s restored from %s as %s (was %s)", store.name, archive.path, target, live)
    return {
        "snapshot": str(archive.path),
        "previous": None if first else live,
        "live": target,
        "points": points,
        "dropped": len(dropped),
        "dropped_products": sorted(dropped)[:20],
        "model": str(artefact) if artefact else None,
        "cut": header.cut.get("at"),
        "seconds": round(time.perf_counter() - started, 3),
        "optimize_seconds": round(optimize_s, 3),  # of those: the new version's optimize()
    }


def _build(
    archive: Archive, index: VectorIndex, dim: int, metadata: dict[str, str], progress: Progress | None
) -> int:
    """Write the archive's products into `index` (a version not live), removing any others it held."""
    before = set(index.sync_records()) if index.exists() else set()
    index.create(dim, metadata)
    written: set[str] = set()
    for chunk in archive.chunks():
        index.upsert(chunk)
        written.update(p.product_id for p in chunk)
        _tell(progress, "restore", len(written), archive.header.points)
    index.delete(sorted(before - written))
    if len(written) != archive.header.points:
        raise SnapshotDamaged(
            f"not restored: {archive.path} holds {len(written)} products, its header counts "
            f"{archive.header.points}; nothing was changed (use another snapshot)"
        )
    return len(written)


def _discard(store: Store, target: str, held: Mapping[str, VectorIndex], serving: Serving | None) -> None:
    """Remove the version a refused restore built (or began to), once no handle holds it: never switched
    to, it would stay listed in `visrec status` as if it were a version to roll forward to. One rebuilt in
    place of an older one had its products replaced already."""
    try:
        if target in held or (serving is not None and serving.holds(store.place(target))):
            log.warning("%s is still open here: not removed after the refused restore", target)
            return
        store.drop(target)
    except (OSError, VisrecError) as exc:  # the refusal is what the user needs to read
        log.warning("could not remove %s after the refused restore: %s", target, exc)


def _refuse_drops(dropped: set[str], force: bool, live: str) -> None:
    if dropped and not force:
        raise WritesWouldBeLost(
            f"not restored: {len(dropped)} products differ between the live {live} and the snapshot "
            f"({_some(dropped)}): written since it was taken, they would be dropped; rerun with --force to "
            "restore anyway (`visrec rollback --force` brings them back)"
        )


def _switch(store: Store, live: str, target: str, serving: Serving | None) -> None:
    """Make `target` live, and served at once by a service (the caller holds its writes): undone if
    the service cannot serve it, or the writes that follow would go to the old version."""
    store.switch(target)
    if serving:
        try:
            serving.switched()
        except BaseException:
            if live != target:
                store.switch(live)
            raise


def find_model(archive: Archive, configured: Path) -> Path | None:
    """The artefact of the snapshot's model here, found by its weights' checksum: where the snapshot
    recorded it, at `configured`, or in a folder beside `configured`; else the one the snapshot
    carries, written beside `configured`. None for a snapshot of a version that records no model.
    Raises `ModelError` when it is nowhere (one line naming where it looked)."""
    model = archive.header.model
    if not model:
        return None
    wanted, checksum = model["model_version"], model.get("weights_sha256")
    recorded = Path(archive.header.metadata.get("artefact", ""))
    candidates = [recorded, configured, *_beside(configured)]
    for candidate in candidates:
        if _holds(candidate, wanted, checksum):
            return candidate
    if model.get("included"):
        into = configured.parent / f"{wanted}-restored"
        archive.extract_model(into)
        if _holds(into, wanted, checksum):
            log.info("the snapshot's model %s written to %s", wanted, into)
            return into
        raise SnapshotDamaged(f"{archive.path}: the model it carries is not {wanted}")
    where = ", ".join(
        str(c) for c in dict.fromkeys([recorded, configured, configured.parent]) if str(c) != "."
    )
    raise ModelError(
        f"not restored: the snapshot's model {wanted} (weights sha256 {str(checksum)[:12]}…) is not here "
        f"(looked in {where}); deploy that artefact beside VISREC_ARTEFACT, or restore a snapshot taken "
        "with --with-model; nothing was changed"
    )


def _beside(configured: Path) -> list[Path]:
    try:
        return sorted(p.parent for p in configured.parent.glob(f"*/{MANIFEST}") if p.parent != configured)
    except OSError:
        return []


def _holds(artefact: Path, model_version: str, weights_sha256: str | None) -> bool:
    """Whether `artefact` is this model: its manifest names it, and its weights are those checksummed."""
    try:
        manifest: Manifest = read_manifest(artefact)
    except ModelError:
        return False
    if manifest.model_version != model_version:
        return False
    if weights_sha256 is None:  # the snapshot could not read the manifest: its version is all it names
        return True
    weights = artefact / manifest.weights_file
    return (
        manifest.weights_sha256 == weights_sha256
        and weights.is_file()
        and sha256_file(weights) == weights_sha256
    )


def _some(ids: set[str], shown: int = 5) -> str:
    listed = ", ".join(repr(i) for i in sorted(ids)[:shown])
    return listed + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


if __name__ == "__main__":
    sys.exit(_child())
