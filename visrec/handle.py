"""The handle on an exported model's embedder that a sync holds: it imports the embedding stage, and so
torch and torchvision (seconds of start-up), only when the first photo needs embedding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visrec.config import EmbedSettings
from visrec.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from visrec.embed import Embedder


class ModelHandle:
    """An exported model as a sync uses it: the manifest at once, the network (and torch) only when the
    first photo needs embedding. `loaded` reuses an embedder already in memory (the service's)."""

    def __init__(
        self, artefact_dir: Path, settings: EmbedSettings | None = None, loaded: Embedder | None = None
    ) -> None:
        self.artefact_dir = artefact_dir
        self.settings = settings or EmbedSettings()
        self._embedder = loaded
        self._manifest = loaded.manifest if loaded is not None else None

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = read_manifest(self.artefact_dir)
        return self._manifest

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    def embedder(self) -> Embedder:
        """The embedder, made on first use (this imports torch; the weights load on the first batch)."""
        if self._embedder is None:
            from visrec.embed import Embedder, resolve_device

            self._embedder = Embedder(self.artefact_dir, resolve_device(self.settings.device), self.settings)
        return self._embedder
