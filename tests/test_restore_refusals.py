"""A restore refused: a forged snapshot whose checksums agree (points that are not what visrec writes) is
refused with one line and exit 2 before anything is switched, and a version it built before refusing is
removed (forged counts, writes met at the last comparison beside a service); a restored version carries
the payload indexes a sync gives. Real `visrec` processes on a real embedded store."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.helpers import settings_env, spawn_visrec
from tests.faults.served import serve
from tests.helpers import COLOURS, SHAPES, draw_product, run_sync, small_settings, write_csv
from tests.test_snapshot import WRITE_KEY, random_store, refused, store_state, visrec, wait_for
from visrec.archive import HEADER, checksum_file
from visrec.artefact import Manifest
from visrec.config import QdrantSettings, Settings
from visrec.index import open_index

Forgery = Callable[[dict[str, bytes], dict[str, Any]], None]  # changes the members and the header


def forge(snapshot: Path, out: Path, change: Forgery) -> Path:
    """A copy of `snapshot` changed by `change`, with every checksum made to agree: the header's
    members and the checksum file, as a forger (or a buggy tool) would write them."""
    with tarfile.open(snapshot) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    header = json.loads(members.pop(HEADER))
    change(members, header)
    for name, data in members.items():
        header["members"].setdefault(name, {}).update(
            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)
        )
    members[HEADER] = json.dumps(header).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    checksum_file(out).write_text(f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out.name}\n")
    return out


def first_line(change: Callable[[dict[str, Any]], None]) -> Forgery:
    """A forgery of the first product's line in the first chunk."""

    def forged(members: dict[str, bytes], header: dict[str, Any]) -> None:
        lines = members["points/000000.jsonl"].decode().splitlines()
        item = json.loads(lines[0])
        change(item)
        lines[0] = json.dumps(item)
        members["points/000000.jsonl"] = ("\n".join(lines) + "\n").encode()

    return forged


def not_finite(members: dict[str, bytes], header: dict[str, Any]) -> None:
    raw = bytearray(members["points/000000.f32"])
    raw[4:8] = b"\x00\x00\xc0\x7f"  # a NaN, little-endian float32
    members["points/000000.f32"] = bytes(raw)


def one_more_point(members: dict[str, bytes], header: dict[str, Any]) -> None:
    header["points"] += 1


FORGED: dict[str, tuple[Forgery, str]] = {
    "a NaN vector": (not_finite, "has a vector that is not finite"),
    "a product with a vector too few": (
        first_line(lambda item: item.update(photos=2)),
        "lacks vectors",
    ),
    "an empty product id": (first_line(lambda item: item.update(id="")), "not a non-empty text"),
    "a product id that is a number": (first_line(lambda item: item.update(id=7)), "not a non-empty text"),
    "a payload that is a list": (first_line(lambda item: item.update(payload=[1])), "not an object"),
    "a payload naming another product": (
        first_line(lambda item: item["payload"].update(product_id="p9")),
        "naming another product",
    ),
    "forged counts": (one_more_point, "its header counts 10"),
}


@pytest.fixture(scope="module")
def snapshotted(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> tuple[Path, Path]:
    """A synced store of 9 products with a title each, and a snapshot of it: (its root, the snapshot)."""
    root = tmp_path_factory.mktemp("restore-refusals")
    rows = []
    for i in range(9):
        draw_product(root / "images" / f"p{i}.png", SHAPES[i % 3], list(COLOURS)[i % 3], variant=i)
        rows.append(
            {"id": f"p{i}", "image": f"images/p{i}.png", "category": SHAPES[i % 3], "title": f"t {i}"}
        )
    settings = small_settings(root, artefact=artefact[0])
    run_sync(write_csv(root / "catalogue.csv", rows), settings)
    taken = visrec(settings, "snapshot", str(root / "snaps"))
    return root, Path(taken["snapshot"])


def copy_of(snapshotted: tuple[Path, Path], tmp_path: Path, artefact: Path) -> Settings:
    import shutil

    shutil.copytree(snapshotted[0] / "qdrant", tmp_path / "qdrant")
    return small_settings(tmp_path, artefact=artefact)


@pytest.mark.parametrize("empty", [False, True], ids=["beside the live version", "onto an empty store"])
@pytest.mark.parametrize("forgery", list(FORGED))
def test_a_forged_snapshot_is_refused_and_leaves_no_version(
    forgery: str, empty: bool, snapshotted: tuple[Path, Path], tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    change, message = FORGED[forgery]
    forged = forge(snapshotted[1], tmp_path / snapshotted[1].name, change)
    settings = (
        small_settings(tmp_path, artefact=artefact[0])
        if empty
        else copy_of(snapshotted, tmp_path, artefact[0])
    )
    before = None if empty else store_state(settings)
    line = refused(settings, "restore", str(forged))
    assert message in line and "nothing was changed" in line, line
    if empty:  # nothing built is left: no version, so nothing to roll to or serve
        assert not list(settings.qdrant.path.glob("products__v*")), list(settings.qdrant.path.iterdir())
    else:
        assert store_state(settings) == before
        assert visrec(settings, "status")["versions"] == ["products__v1"]


def test_a_restored_version_has_the_payload_indexes_a_sync_gives(
    snapshotted: tuple[Path, Path], tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    with open_index(QdrantSettings(path=snapshotted[0] / "qdrant")) as synced:
        want = synced._payload_schema()
    assert any("title" in key for key in want)
    settings = small_settings(tmp_path, artefact=artefact[0])
    assert visrec(settings, "restore", str(snapshotted[1]))["live"] == "products__v1"
    with open_index(settings.qdrant) as restored:
        assert restored._payload_schema() == want


def test_a_restore_refused_at_its_last_comparison_beside_a_service_removes_its_build(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    """A PATCH while the restore builds: the comparison made with writes held finds it, the restore is
    refused (exit 2) and the version it built is gone from `visrec status`."""
    settings = random_store(tmp_path, artefact[0], 2500)
    taken = visrec(settings, "snapshot", str(tmp_path / "snaps"))
    with serve(settings, tmp_path / "serve.log", env={"VISREC_API__WRITE_KEY": WRITE_KEY}) as served:
        restoring = spawn_visrec(
            settings_env(settings), tmp_path / "restore.log", tmp_path, "restore", taken["snapshot"]
        )
        wait_for(lambda: (settings.qdrant.path / "products__v2").is_dir())
        with httpx.Client(base_url=served.url, timeout=30, headers={"X-API-Key": WRITE_KEY}) as client:
            assert client.patch("/products/p1", json={"price": 99}).status_code == 200
        assert restoring.wait(120) == 2, (tmp_path / "restore.log").read_text()
        assert "products differ between the live products__v1" in (tmp_path / "restore.log").read_text()
        status = visrec(settings, "status")
        assert (status["live_version"], status["versions"]) == ("products__v1", ["products__v1"])
    assert not (settings.qdrant.path / "products__v2").exists()
