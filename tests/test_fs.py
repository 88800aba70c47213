"""The one durable atomic write: readers see the old content or the new, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from visrec.fs import replacing, write_atomically


def test_write_atomically_replaces_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "alias"
    write_atomically(target, "v1")
    write_atomically(target, b"v2")
    assert target.read_text() == "v2"
    assert [p.name for p in target.parent.iterdir()] == ["alias"]  # no temporary file left


def test_a_write_that_fails_leaves_the_old_content_and_no_debris(tmp_path: Path) -> None:
    target = tmp_path / "report.jsonl"
    write_atomically(target, "old\n")
    with pytest.raises(RuntimeError), replacing(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.jsonl"]
