"""The GPU kit's files (benchmarks/gpu_kit.py pack-data, tiny-data, checksums, verify, size; docs/gpu.md):
Fashion-MNIST (Debian's dataset-fashion-mnist, 31 MB as gzip) as the same idx files xz-compressed
(26 MB), read as they are by `common.read_idx`; a tiny Fashion-MNIST from the bundled sample for dry
runs; the kit's SHA256SUMS, which lists every file of the kit (`sha256sum -c` reads it too); and the
kit's size with the working tree's, against what a device call carries.

Only the standard library and numpy are imported at the top, so the checksum and size steps run before
anything is installed; Pillow and the benchmarks' `common` are imported where they are used.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import subprocess
from pathlib import Path

import numpy as np

from gpu_kit_layout import IDX_FILES, ROOT, SUMS


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- data ---------------------------------------------------------------------------------------------


def pack_data(source: Path, out: Path, preset: int = 9) -> None:
    """Fashion-MNIST's four idx .gz files (Debian's) as .xz files in `out`; each checked to decompress to
    the original bytes."""
    out.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        original = gzip.decompress((source / f"{name}.gz").read_bytes())
        packed = lzma.compress(original, preset=preset)
        if lzma.decompress(packed) != original:
            raise ValueError(f"{name}: xz round trip failed")
        (out / f"{name}.xz").write_bytes(packed)


def tiny_data(out: Path, train: int, test: int) -> None:
    """A Fashion-MNIST of `train` + `test` images, taken from the bundled sample (itself Fashion-MNIST
    test images), for dry runs: the same files, xz-compressed as in the kit."""
    from PIL import Image

    from common import SAMPLE_CATALOGUE, catalogue_rows

    # The sample's category names, in Fashion-MNIST's label order (scripts/make_sample_catalogue.py).
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
    names.append("Ankle boot")
    rows = catalogue_rows()
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[: train + test]]
    pixels = np.stack(
        [np.asarray(Image.open(SAMPLE_CATALOGUE.parent / r["image"]).convert("L")) for r in rows]
    )
    labels = np.array([names.index(r["category"]) for r in rows], np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, train)), ("t10k", slice(train, train + test))):
        images, classes = pixels[part], labels[part]
        header = b"\0\0\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
        (out / f"{prefix}-images-idx3-ubyte.xz").write_bytes(
            lzma.compress(header + images.tobytes(), preset=0)
        )
        header = b"\0\0\x08\x01" + len(classes).to_bytes(4, "big")
        (out / f"{prefix}-labels-idx1-ubyte.xz").write_bytes(
            lzma.compress(header + classes.tobytes(), preset=0)
        )


# --- checksums and sizes ------------------------------------------------------------------------------


def kit_files(kit: Path) -> list[Path]:
    return sorted(p for p in kit.rglob("*") if p.is_file() and p.name != SUMS)


def write_sums(kit: Path) -> None:
    """SHA256SUMS in `sha256sum` format, paths relative to the kit."""
    lines = [f"{sha256(p)}  {p.relative_to(kit).as_posix()}\n" for p in kit_files(kit)]
    (kit / SUMS).write_text("".join(lines))


def verify_sums(kit: Path) -> list[str]:
    """One line per problem: a listed file missing or changed, a file not listed."""
    sums = kit / SUMS
    if not sums.is_file():
        return [f"{sums}: missing (build the kit with scripts/gpu_kit.sh and carry it)"]
    problems, listed = [], set()
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed.add(name)
        path = kit / name
        if not path.is_file():
            problems.append(f"{path}: listed in {SUMS} but missing")
        elif sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from {SUMS} (damaged in transfer?)")
    problems += [f"{p}: not in {SUMS}" for p in kit_files(kit) if p.relative_to(kit).as_posix() not in listed]
    return problems


def tree_bytes(root: Path = ROOT) -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files (and a
    `shared/` folder in the checkout, where there is one)."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    files = {root / os.fsdecode(name) for name in listed if name}
    shared = root / "shared"
    if shared.is_dir():
        files |= {p for p in shared.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def size_report(kit: Path, limit_mib: float) -> tuple[bool, str]:
    kit_b = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    tree_b = tree_bytes()
    parts = {
        d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        for d in kit.iterdir()
        if d.is_dir()
    }
    total = (kit_b + tree_b) / 2**20
    detail = ", ".join(f"{name} {b / 2**20:.1f}" for name, b in sorted(parts.items()))
    line = (
        f"kit {kit_b / 2**20:.1f} MiB ({detail}) + working tree {tree_b / 2**20:.1f} MiB = {total:.1f} MiB "
        f"of the {limit_mib:g} MiB allowed (the device call carries at most 64 MiB)"
    )
    return total <= limit_mib, line
