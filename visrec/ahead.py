"""Embedding a catalogue's photos, and photos embedded ahead of the service's writer (`Ahead`): the
writer is then held to decide and write, not to fetch and embed."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from visrec.catalogue import Catalogue
from visrec.colour import extract_colours
from visrec.handle import ModelHandle

if TYPE_CHECKING:  # torch: imported only once a photo needs embedding
    from visrec.embed import EmbeddedBatch
    from visrec.images import ImageLimits


def embed_photos(
    catalogue: Catalogue, model: ModelHandle, limits: ImageLimits, refs: list[str]
) -> Iterator[EmbeddedBatch]:
    """The catalogue's photos `refs`, embedded batch by batch in order. Photos are opened without links,
    inside the folders the catalogue was allowed (checked at open: a photo swapped for a link after the
    catalogue was read is refused)."""
    within = limits.within(catalogue.base_dir, *catalogue.image_roots)
    return model.embedder().embed_refs(refs, within, annotate=colour_fields)


def colour_fields(image: Image.Image) -> dict[str, Any]:
    """Colour extracted from the photo (runs in the loader workers, on the already decoded image)."""
    fields = extract_colours(image).payload()
    return {**fields, "colour_extracted": fields["colour"]}


@dataclass
class Ahead:  # filled as photos are embedded (`add`): not frozen
    """Photos embedded before a write takes the service's writer, by one model: each ref's vector and
    colour fields, or why it failed. The writer is then held to decide and write, not to fetch and
    embed (`visrec.product_writes`; a reindex's catch-up, `versions.WrittenMeanwhile`). Requests add to
    one concurrently (a reindex's): its maps change under `_lock`, the embedding runs outside it."""

    model_version: str
    vectors: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, catalogue: Catalogue, model: ModelHandle, limits: ImageLimits, refs: Sequence[str]) -> None:
        """Embed those of the catalogue's photos `refs` not embedded (or failed) yet."""
        with self._lock:
            todo = list(dict.fromkeys(r for r in refs if r not in self.vectors and r not in self.failed))
        for batch in embed_photos(catalogue, model, limits, todo) if todo else []:
            with self._lock:
                for i, vector, extra in zip(batch.indices, batch.vectors, batch.extras, strict=True):
                    self.vectors[todo[i]] = (vector, extra)
                self.failed.update((todo[i], error) for i, error in batch.failures)

    def merge(self, other: Ahead) -> None:
        """Take what `other` embedded, if by the same model (another model's vectors are no use here)."""
        if other.model_version == self.model_version:
            with self._lock, other._lock:
                self.vectors.update(other.vectors)
                self.failed.update(other.failed)

    def batch(self, refs: list[str]) -> EmbeddedBatch:
        """`refs`, every one embedded (or failed), as one embedded batch."""
        from visrec.embed import EmbeddedBatch

        with self._lock:
            done = [i for i, ref in enumerate(refs) if ref in self.vectors]
            vectors = [self.vectors[refs[i]][0] for i in done]
            return EmbeddedBatch(
                done,
                np.stack(vectors) if vectors else np.empty((0, 0), np.float32),
                [(i, self.failed[ref]) for i, ref in enumerate(refs) if ref not in self.vectors],
                [self.vectors[refs[i]][1] for i in done],
            )
