"""Embedding: exported model + manifest preprocessing → 1000-d float32 vectors, in batches.

The model loads lazily and once (`load()` is idempotent), so a sync with nothing to embed never pays
for it. Decoding runs in DataLoader worker processes so the device never waits on JPEG decoding; with
`decode_on_device`, the device decodes plain JPEGs itself (nvJPEG) and the workers only check them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visrec.artefact import Manifest, load_artefact, read_manifest
from visrec.config import EmbedSettings
from visrec.errors import ModelError
from visrec.images import (
    Annotate,
    ImageBatch,
    ImageDataset,
    ImageLimits,
    JpegPassThrough,
    collate_images,
    preprocess_jpegs,
    to_tensor,
)
from visrec.model import VisrecNet


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU. Called once, at an entry point."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class EmbeddedBatch:
    """Vectors for the images at `indices` (positions in the input), and the images that failed."""

    indices: list[int]
    vectors: np.ndarray  # (len(indices), dim) float32
    failures: list[tuple[int, str]]
    extras: list[dict[str, Any]]  # what `annotate` said of each image, aligned with `indices`


class Embedder:
    """Turns images into embeddings with an exported artefact, as `settings` say (precision, batch size,
    decoding workers, …)."""

    def __init__(
        self, artefact_dir: Path, device: torch.device, settings: EmbedSettings | None = None
    ) -> None:
        settings = settings or EmbedSettings()
        if settings.precision == "fp16" and device.type != "cuda":
            raise ModelError("fp16 embedding needs a CUDA device; use bf16 or fp32 on the CPU")
        self.artefact_dir = artefact_dir
        self.device = device
        self.settings = settings
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
        self.pin_memory = settings.pin_memory and device.type == "cuda"
        self._manifest: Manifest | None = None
        self._model: VisrecNet | None = None
        self._embed: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = read_manifest(self.artefact_dir)
        return self._manifest

    def load(self) -> VisrecNet:
        """Load the weights (once); raises `ModelError` if the artefact is missing or corrupt."""
        if self._model is None:
            model, self._manifest = load_artefact(self.artefact_dir, self.device)
            self._model = model.to(memory_format=self.memory_format)
            # Compiled on the first batch (tens of seconds), then fused kernels; a new batch shape
            # recompiles once, with dynamic shapes.
            self._embed = torch.compile(self._model.embed) if self.settings.compile else self._model.embed
        return self._model

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed (B, 3, S, S) batch, on the host or already on the device."""
        self.load()
        assert self._embed is not None
        pixels = pixels.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ),
        ):
            vectors = self._embed(pixels)
        return vectors.float().cpu().numpy()  # one host copy per batch

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """Embed one decoded RGB image: a (dim,) vector."""
        return self.embed_pixels(to_tensor(image, self.manifest.preprocess).unsqueeze(0))[0]

    def embed_refs(
        self, refs: Sequence[str], limits: ImageLimits, annotate: Annotate | None = None
    ) -> Iterator[EmbeddedBatch]:
        """Embed images by path or URL, yielding one batch at a time in input order.

        A file that cannot be read or decoded is reported in the batch's `failures`, never raised.
        `annotate` runs on each decoded image in the loader workers (e.g. colour extraction).
        """
        if not refs:
            return
        source = JpegPassThrough if self.settings.decode_on_device else ImageDataset
        dataset = source(refs, self.manifest.preprocess, limits, annotate=annotate)
        loader = DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            num_workers=0 if len(refs) <= IN_THREAD_PHOTOS else min(self.settings.workers, len(refs)),
            collate_fn=collate_images,
            pin_memory=self.pin_memory,
            worker_init_fn=_release_inherited_locks,
        )
        for batch in loader:
            vectors = (
                self.embed_pixels(self._pixels(batch))
                if batch.indices
                else np.empty((0, self.manifest.embedding_dim), np.float32)
            )
            yield EmbeddedBatch(batch.indices, vectors, batch.failures, batch.extras)

    def _pixels(self, batch: ImageBatch) -> torch.Tensor:
        """The batch's images as one tensor in `batch.indices` order, decoding any encoded ones."""
        if not batch.encoded:
            return batch.pixels
        decoded = preprocess_jpegs(batch.encoded, self.manifest.preprocess, self.device)
        if not len(batch.pixels):
            return decoded
        return torch.cat([batch.pixels.to(self.device, non_blocking=True), decoded])


# Up to this many photos are read in the calling thread: starting loader workers from a service holding a
# large collection took 0.25 s, twice what embedding one photo takes (an HTTP PUT's usual load).
IN_THREAD_PHOTOS = 4


def _release_inherited_locks(worker_id: int) -> None:
    """Loader `worker_init_fn`: close the descriptors this worker inherited that it must not keep.

    A forked worker shares its parent's open files. A lock belongs to the open file (the embedded store's
    WAL lock): workers outliving a SIGKILLed sync by seconds kept the store "in use" for the rerun. A
    socket (the service's listening socket and its clients', when a service embeds a handed-over sync)
    would stay open in the worker: a killed service's port stays taken, a client's connection unclosed.
    Workers read images by path, fetch over their own connections and talk to the loader through pipes:
    they need none of those. Linux lists a descriptor's locks in /proc; elsewhere workers start by spawn
    and inherit nothing.
    """
    fdinfo = Path("/proc/self/fdinfo")
    if not fdinfo.is_dir():
        return
    for entry in fdinfo.iterdir():
        try:
            fd = int(entry.name)
            if "\nlock:" in entry.read_text() or os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.close(fd)
        except (OSError, ValueError):  # gone meanwhile (the listing's own descriptor), or not a number
            continue
