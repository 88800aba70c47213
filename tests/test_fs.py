"""The one durable atomic write (readers see the old content or the new, never a part), and copying a
folder that is being written."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visrec.fs import allocated_bytes, copy_tree_sparse, match_tree, replacing, write_atomically

MIB = 1 << 20


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


# A copy taken while its source is written, then matched (`match_tree`) with the writes stopped, must be
# the source byte for byte: the optimized copy and the snapshot hold writes only for the match.
Op = tuple[str, int, int, int]  # (kind, file, offset, length)
ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "truncate", "extend", "remove", "new_sparse", "folder"]),
        st.integers(0, 3),
        st.integers(0, 3 * MIB),
        st.integers(1, 300_000),
    ),
    max_size=12,
)


def _apply(root: Path, op: Op, seed: int) -> None:
    kind, n, offset, length = op
    path = root / ("sub" if n % 2 else "") / f"f{n}"
    path.parent.mkdir(exist_ok=True)
    if kind == "folder":
        shutil.rmtree(root / "sub", ignore_errors=True)
        return
    if kind == "remove":
        path.unlink(missing_ok=True)
        return
    with open(path, "r+b" if path.exists() else "xb") as f:
        if kind == "truncate":
            f.truncate(offset // 2)
        elif kind == "extend":
            f.truncate(offset + length)  # a hole at the end
        elif kind == "new_sparse":
            f.truncate(0)
            f.seek(offset)
            f.write(random.Random(seed).randbytes(length))
        else:
            f.seek(offset)
            f.write(random.Random(seed).randbytes(length) if seed % 3 else bytes(length))


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@settings(max_examples=25, deadline=None)
@given(before=ops, during=ops, after=ops)
def test_a_copy_matched_after_writes_is_the_source_byte_for_byte(
    before: list[Op], during: list[Op], after: list[Op]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "source", Path(tmp) / "copy"
        source.mkdir()
        for i, op in enumerate(before):
            _apply(source, op, i)
        copy_tree_sparse(source, target)
        assert _tree(target) == _tree(source)
        for i, op in enumerate([*during, *after]):
            _apply(source, op, 1000 + i)
        match_tree(source, target)
        assert _tree(target) == _tree(source)
        assert match_tree(source, target) == 0  # nothing left to rewrite


def test_a_copy_taken_while_a_thread_writes_is_exact_once_matched(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "copy"
    source.mkdir()
    for n in range(4):
        with open(source / f"f{n}", "wb") as f:
            f.truncate(8 * MIB)  # sparse, as the engine's files are
            f.write(b"head")
    stop = threading.Event()

    def write() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            with open(source / f"f{rng.randrange(4)}", "r+b") as f:
                f.seek(rng.randrange(8 * MIB))
                f.write(rng.randbytes(rng.randrange(1, 70_000)))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        copy_tree_sparse(source, target)
    finally:
        stop.set()
        writer.join()
    rewritten = match_tree(source, target)
    assert _tree(target) == _tree(source)
    assert rewritten < 4 * 8 * MIB  # only what differed
    assert allocated_bytes(target) <= allocated_bytes(source) + 64 * 1024  # holes stay holes
