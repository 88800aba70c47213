"""A catalogue photo swapped for a symbolic link after the catalogue was read and checked (issue #25):
opened without following links, at open, not only when the catalogue was read. `images.open_local` on
real files, links and FIFOs; a real sync whose photo is swapped between reading the catalogue and
embedding; the HTTP photo route is in tests/faults/test_api_leaks.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import MakeCatalogue, run_sync
from visrec.catalogue import read_catalogue
from visrec.config import Settings
from visrec.errors import ImageError
from visrec.images import ANY_FOLDER, ImageLimits, open_local, read_image_bytes
from visrec.index import open_index


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/shop/photos/a.png (a photo), root/secret.png outside the shop's folder."""
    (tmp_path / "shop" / "photos").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "shop" / "photos" / "a.png")
    Image.new("RGB", (8, 8), "black").save(tmp_path / "secret.png")
    return tmp_path.resolve()


def test_a_photo_inside_its_root_is_opened(tree: Path) -> None:
    photo = tree / "shop" / "photos" / "a.png"
    for roots in ([str(tree / "shop")], ANY_FOLDER, None):
        with open_local(str(photo), roots) as file:
            assert file.read() == photo.read_bytes()


def test_a_link_at_the_file_or_on_the_way_is_refused(tree: Path) -> None:
    shop, photo = tree / "shop", tree / "shop" / "photos" / "a.png"
    photo.unlink()
    photo.symlink_to(tree / "secret.png")  # the file swapped for a link
    for roots in ([str(shop)], ANY_FOLDER):
        with pytest.raises(ImageError, match="symbolic link"):
            open_local(str(photo), roots)
    with open_local(str(photo), None) as file:  # a file the operator names: followed, as before
        assert file.read() == (tree / "secret.png").read_bytes()
    photo.unlink()
    (tree / "elsewhere").mkdir()
    Image.new("RGB", (8, 8), "black").save(tree / "elsewhere" / "a.png")
    (shop / "photos").rmdir()
    (shop / "photos").symlink_to(tree / "elsewhere")  # a folder on the way swapped for a link
    with pytest.raises(ImageError, match="symbolic link"):
        open_local(str(shop / "photos" / "a.png"), [str(shop)])


def test_outside_the_roots_missing_and_not_a_file_are_refused(tree: Path) -> None:
    shop = str(tree / "shop")
    with pytest.raises(ImageError, match="outside"):
        open_local(str(tree / "secret.png"), [shop])
    with pytest.raises(ImageError, match="outside"):
        open_local(str(tree / "shop" / ".." / "secret.png"), [shop])
    with pytest.raises(ImageError, match="file not found"):
        open_local(str(tree / "shop" / "nope.png"), [shop])
    with pytest.raises(ImageError, match="file not found"):
        open_local(str(tree / "shop" / "photos" / "a.png" / "x"), [shop])  # a file on the way
    with pytest.raises(ImageError, match="not a regular file"):
        open_local(str(tree / "shop" / "photos"), [shop])
    fifo = tree / "shop" / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):  # refused without blocking
        open_local(str(fifo), [shop])
    limits = ImageLimits(max_bytes=10).within(shop)
    with pytest.raises(ImageError, match="above the limit"):
        read_image_bytes(str(tree / "shop" / "photos" / "a.png"), limits)


def test_a_photo_swapped_for_a_link_after_the_catalogue_was_read_is_not_indexed(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """The catalogue is read (p1's path resolved and checked inside its folder), then p1.png becomes a
    link to a photo outside, then the sync embeds: p1 is refused at open, the others are indexed."""
    catalogue = read_catalogue(make_catalogue(6), settings.ingest)
    photo = tmp_path / "images" / "p1.png"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.new("RGB", (32, 32), "black").save(outside)
    photo.unlink()
    photo.symlink_to(outside)
    summary = run_sync(catalogue, settings)
    assert summary.added == 5 and summary.failed == 1, summary
    report = settings.ingest.failure_report.read_text()
    assert "symbolic link" in report and '"p1"' in report
    with open_index(settings.qdrant) as index:
        assert index.get("p1") is None and index.get("p2") is not None
