"""The sync plan: what decides a product's vectors and what decides only its payload, and the quick check
that spares reading unchanged local photos."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from visrec import plan
from visrec.catalogue import read_catalogue


def _catalogue(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "c.csv"
    path.write_text("id,image,price\n" + rows)
    return path


def test_vectors_hash_follows_photo_bytes_and_metadata_hash_the_rest(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"one")
    catalogue = read_catalogue(_catalogue(tmp_path, "a,a.png,1\n"))
    product, refs = catalogue.products[0], catalogue.photo_refs(catalogue.products[0])
    first = plan.bookkeeping(product, refs, plan.photo_files(refs, [])[0], "m")
    (tmp_path / "a.png").write_bytes(b"two")
    photo_changed = plan.bookkeeping(product, refs, plan.photo_files(refs, [])[0], "m")
    assert photo_changed.vectors_hash != first.vectors_hash
    assert photo_changed.metadata_hash == first.metadata_hash
    (tmp_path / "a.png").write_bytes(b"one")
    priced = read_catalogue(_catalogue(tmp_path, "a,a.png,2\n"))
    price_changed = plan.bookkeeping(priced.products[0], refs, plan.photo_files(refs, [])[0], "m")
    assert price_changed.vectors_hash == first.vectors_hash
    assert price_changed.metadata_hash != first.metadata_hash


def test_the_quick_check_reads_only_photos_whose_size_or_time_changed(tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(b"one")
    files, read = plan.photo_files([str(photo)], [])
    assert read == 3 and files[0][0] == str(photo) and files[0][1] == 3
    again, read = plan.photo_files([str(photo)], files)
    assert (again, read) == (files, 0)  # nothing read
    photo.write_bytes(b"three")
    changed, read = plan.photo_files([str(photo)], files)
    assert read == 5 and changed[0][5] != files[0][5]


def test_the_one_change_the_quick_check_misses_needs_checksum(tmp_path: Path) -> None:
    """Same size, modification time set back: only hashing the bytes (`--checksum`) sees it."""
    photo = tmp_path / "a.png"
    photo.write_bytes(b"one")
    files, _ = plan.photo_files([str(photo)], [])
    stat = photo.stat()
    with photo.open("r+b") as f:  # same file (inode), same size, other bytes
        f.write(b"two")
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    missed, read = plan.photo_files([str(photo)], files)
    assert missed == files and read == 0
    hashed, read = plan.photo_files([str(photo)], [])  # what --checksum does: no recorded files
    assert hashed[0][5] != files[0][5] and read == 3


def test_a_fifo_is_never_read(tmp_path: Path) -> None:
    """A FIFO (or a device) would block a read forever: it hashes as unreadable, never opened. Run aside,
    so that code opening it fails here at once instead of hanging the run (as a mutant did, until
    mutmut's timeout)."""
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    result: list[tuple[list[list[Any]], int]] = []
    worker = threading.Thread(target=lambda: result.append(plan.photo_files([str(fifo)], [])), daemon=True)
    worker.start()
    while worker.is_alive():
        try:  # opens only while a reader has the FIFO open (or waits in open); closing at once frees it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader
            worker.join(0.01)
            continue
        worker.join(10)
        pytest.fail("photo_files opened the FIFO")
    files, read = result[0]
    assert files[0][5] == "unreadable" and read == 0


def test_remote_photos_are_identified_by_url(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,image\na,https://example.com/a.jpg\n")
    catalogue = read_catalogue(tmp_path / "c.csv")
    product = catalogue.products[0]
    files, read = plan.photo_files(catalogue.photo_refs(product), [])
    assert files == [] and read == 0
    record = plan.bookkeeping(product, catalogue.photo_refs(product), files, "m")
    assert record.vectors_hash.startswith(f"{plan.PAYLOAD_VERSION}:")


def test_legacy_hash_is_the_one_points_carried_before_the_split(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"one")
    catalogue = read_catalogue(_catalogue(tmp_path, "a,a.png,1\n"))
    digest = plan.legacy_content_hash(catalogue, catalogue.products[0])
    # payload version 2's rule: sha256(metadata json, then each photo's bytes)
    import hashlib
    import json

    expected = hashlib.sha256(
        json.dumps(catalogue.products[0].metadata(), sort_keys=True, default=str).encode() + b"one"
    ).hexdigest()
    assert digest == f"2:{expected}"


def test_legacy_hash_of_every_kind_of_photo(tmp_path: Path) -> None:
    """Version 2's rule for each photo in order: a remote one's URL, a local one's bytes (read in chunks:
    a photo larger than one), an unreadable one a fixed marker; the metadata as sorted JSON. Points carry
    this hash: a change of rule re-embeds every product they hold."""
    import hashlib
    import json

    (tmp_path / "c.csv").write_text("id,image,zeta,alpha\na,a.png,z,a\n")
    (tmp_path / "a.png").write_bytes(b"one")
    big = os.urandom(3 << 20)
    (tmp_path / "big.png").write_bytes(big)
    catalogue = read_catalogue(tmp_path / "c.csv")
    product = catalogue.products[0]
    url = "https://example.com/a.jpg"
    refs = (url, str(tmp_path / "gone.png"), str(tmp_path / "big.png"), str(tmp_path / "a.png"))
    catalogue.photos[product.id] = refs
    metadata = product.metadata()
    assert list(metadata) != sorted(metadata)  # the JSON's order is the sort's, not the row's
    expected = hashlib.sha256(
        json.dumps(metadata, sort_keys=True).encode() + url.encode() + b"\0unreadable" + big + b"one"
    ).hexdigest()
    assert plan.legacy_content_hash(catalogue, product) == f"2:{expected}"


def test_photo_files_records_each_local_photo_in_order(tmp_path: Path) -> None:
    """Remote photos are skipped, an unreadable one recorded as such, and every photo after either is
    still recorded; the bytes read add up over the photos (a large one read in chunks)."""
    big = os.urandom(3 << 20)
    (tmp_path / "big.png").write_bytes(big)
    (tmp_path / "a.png").write_bytes(b"one")
    local = [str(tmp_path / "big.png"), str(tmp_path / "a.png")]
    refs = ["https://example.com/a.jpg", str(tmp_path / "gone.png"), *local]
    files, read = plan.photo_files(refs, [])
    assert [f[0] for f in files] == refs[1:] and read == len(big) + 3
    assert files[0] == [refs[1], -1, -1, -1, -1, "unreadable"]
    import hashlib

    assert files[1][5] == hashlib.sha256(big).hexdigest() and files[1][1] == len(big)
    # The first photo unchanged (not read), the second rewritten: the second is still read and recorded.
    (tmp_path / "a.png").write_bytes(b"three")
    again, read = plan.photo_files(local, files[1:])
    assert again[0] == files[1] and again[1][5] == hashlib.sha256(b"three").hexdigest() and read == 5


def test_a_malformed_recorded_entry_is_no_quick_check(tmp_path: Path) -> None:
    """A recorded entry that is not [ref, size, mtime, inode, device, sha256] (a point written by
    another version, or damaged) is ignored: the photo is read and hashed again."""
    (tmp_path / "a.png").write_bytes(b"one")
    ref = str(tmp_path / "a.png")
    files, _ = plan.photo_files([ref], [])
    for damaged in ([files[0][:5]], [tuple(files[0])], [files[0] + ["extra"]]):
        again, read = plan.photo_files([ref], damaged)  # type: ignore[arg-type]
        assert again == files and read == 3


def test_bookkeeping_records_what_decided_the_point(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"one")
    catalogue = read_catalogue(_catalogue(tmp_path, "a,a.png,1\n"))
    product, refs = catalogue.products[0], catalogue.photo_refs(catalogue.products[0])
    files, _ = plan.photo_files(refs, [])
    record = plan.bookkeeping(product, refs, files, "model-1")
    assert (record.photo_files, record.model_version, record.source) == (files, "model-1", "catalogue")
    assert record.metadata_hash == plan.metadata_hash(product)
    assert plan.bookkeeping(product, refs, files, "model-1", source="api").source == "api"
