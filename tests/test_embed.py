"""Embedding fast paths give the same neighbours as the plain fp32 path (correctness, not speed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import COLOURS, SHAPES, draw_product
from visrec.artefact import Manifest
from visrec.config import EmbedSettings
from visrec.embed import EmbeddedBatch, Embedder
from visrec.errors import ModelError
from visrec.images import ImageLimits

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("embed")
    return [
        str(draw_product(root / f"{i}.png", SHAPES[i % 3], list(COLOURS)[(i // 3) % 3], variant=i))
        for i in range(48)
    ]


@pytest.fixture(scope="module")
def jpeg_refs(refs: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The same products as JPEGs of a few sizes and shapes, then a corrupt one and a PNG."""
    root = tmp_path_factory.mktemp("jpegs")
    sizes = [(48, 48), (120, 90), (64, 200), (300, 300)]
    out = []
    for i, ref in enumerate(refs):
        path = root / f"{i}.jpg"
        Image.open(ref).resize(sizes[i % len(sizes)], Image.Resampling.BICUBIC).save(path, quality=90)
        out.append(str(path))
    (root / "corrupt.jpg").write_bytes(Path(out[0]).read_bytes()[:300])
    return [*out, str(root / "corrupt.jpg"), refs[0]]


def _embedder(artefact: Path, device: str, **settings: Any) -> Embedder:
    return Embedder(artefact, torch.device(device), EmbedSettings(batch_size=16, workers=0, **settings))


def _vectors(embedder: Embedder, refs: list[str]) -> np.ndarray:
    return np.concatenate([b.vectors for b in embedder.embed_refs(refs, ImageLimits())])


def _top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each item's 10 nearest neighbours (itself excluded) that both embeddings agree on."""

    def neighbours(v: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(v[:, None] - v[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :10]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(na, nb, strict=True)]))


def test_channels_last_matches_fp32(artefact: tuple[Path, Manifest], refs: list[str]) -> None:
    plain = _vectors(_embedder(artefact[0], "cpu"), refs)
    fast = _vectors(_embedder(artefact[0], "cpu", channels_last=True), refs)
    np.testing.assert_allclose(fast, plain, rtol=1e-3, atol=1e-3)


def test_bf16_keeps_the_neighbours(artefact: tuple[Path, Manifest], refs: list[str]) -> None:
    plain = _vectors(_embedder(artefact[0], "cpu"), refs)
    reduced = _vectors(_embedder(artefact[0], "cpu", channels_last=True, precision="bf16"), refs)
    assert reduced.dtype == np.float32 and reduced.shape == plain.shape
    assert _top10_overlap(plain, reduced) >= 0.95


def test_torch_compile_matches_the_plain_path(artefact: tuple[Path, Manifest], refs: list[str]) -> None:
    # 48 images in batches of 16: one shape, so one compilation (about 30 s on 2 cores).
    plain = _vectors(_embedder(artefact[0], "cpu"), refs)
    compiled = _vectors(_embedder(artefact[0], "cpu", compile=True), refs)
    np.testing.assert_allclose(compiled, plain, rtol=1e-3, atol=1e-3)


def test_decoding_on_the_device_keeps_the_neighbours(
    artefact: tuple[Path, Manifest], jpeg_refs: list[str]
) -> None:
    # On the CPU the "device" decoder is torchvision's libjpeg one: the path is the one CUDA takes.
    embedders = [_embedder(artefact[0], "cpu", decode_on_device=d) for d in (False, True)]
    plain, on_device = ([*e.embed_refs(jpeg_refs, ImageLimits())] for e in embedders)
    assert [b.failures for b in on_device] == [b.failures for b in plain]
    assert [i for b in on_device for i, _ in b.failures] == [len(jpeg_refs) - 2]  # the corrupt one

    def by_index(batches: list[EmbeddedBatch]) -> np.ndarray:
        indices = [i for b in batches for i in b.indices]
        return np.concatenate([b.vectors for b in batches])[np.argsort(indices)]

    assert _top10_overlap(by_index(plain), by_index(on_device)) >= 0.95  # 0.994 measured


def test_fp16_on_cpu_is_refused(artefact: tuple[Path, Manifest]) -> None:
    with pytest.raises(ModelError, match="needs a CUDA device"):
        _embedder(artefact[0], "cpu", precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_reduced_precision_keeps_the_neighbours(
    artefact: tuple[Path, Manifest], refs: list[str], precision: str
) -> None:
    plain = _vectors(_embedder(artefact[0], "cpu"), refs)
    gpu = _vectors(_embedder(artefact[0], "cuda", channels_last=True, precision=precision), refs)
    assert _top10_overlap(plain, gpu) >= 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_nvjpeg_decoding_keeps_the_neighbours(artefact: tuple[Path, Manifest], jpeg_refs: list[str]) -> None:
    refs = jpeg_refs[:-2]  # the plain JPEGs: all of them go to nvJPEG
    plain = _vectors(_embedder(artefact[0], "cpu"), refs)
    gpu = _vectors(_embedder(artefact[0], "cuda", decode_on_device=True), refs)
    assert _top10_overlap(plain, gpu) >= 0.95


def test_workers_default_to_the_usable_cores_where_the_os_cannot_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS and Windows have no sched_getaffinity: the default falls back to the core count."""
    assert EmbedSettings().workers == min(64, len(os.sched_getaffinity(0)))
    monkeypatch.delattr(os, "sched_getaffinity")
    assert EmbedSettings().workers == min(64, os.cpu_count() or 1)


def test_loader_workers_let_go_of_inherited_sockets_and_locks(tmp_path: Path) -> None:
    """A worker forked from a serving process must not keep its listening socket (a killed service's
    port would stay taken) nor the store's lock: the worker's init closes both, and nothing else."""
    import fcntl
    import json
    import os
    import socket

    from visrec.embed import _release_inherited_locks

    listening = socket.create_server(("127.0.0.1", 0))
    locked = (tmp_path / "lock").open("w")
    fcntl.flock(locked, fcntl.LOCK_EX)
    plain = (tmp_path / "plain").open("w")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        _release_inherited_locks(0)
        still = []
        for fd in (listening.fileno(), locked.fileno(), plain.fileno(), write):
            try:
                os.fstat(fd)
                still.append(fd)
            except OSError:
                pass
        os.write(write, json.dumps(still).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    still = json.loads(os.read(read, 1000))
    assert still == [plain.fileno(), write]
    listening.close()
    locked.close()
    plain.close()
