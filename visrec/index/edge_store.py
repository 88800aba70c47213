"""The embedded store's versions and alias: each version a folder under the store's root (with the
optimized copies that replace it), the alias a file beside them."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from visrec.config import QdrantSettings
from visrec.errors import InvalidSetting
from visrec.fs import folder_problem, sweep_temporaries, write_atomically
from visrec.index.edge import EdgeIndex, current_folder
from visrec.index.edge_copy import GENERATION, pointer
from visrec.index.store import Store

log = logging.getLogger(__name__)


class EdgeStore(Store):
    """Versions as folders `root/<name>__v<n>/`; the alias is the file `root/<name>.alias`, replaced
    by an atomic rename."""

    def __init__(self, settings: QdrantSettings) -> None:
        super().__init__(settings.collection)
        problem = folder_problem(
            settings.path, writing=False
        )  # (a read-only store is the engine's to refuse)
        if problem:
            raise InvalidSetting(f"VISREC_QDRANT__PATH: {problem}")
        self.settings = settings
        self.root = settings.path
        self.alias_file = self.root / f"{self.name}.alias"

    def _collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted({p.name.split(GENERATION)[0] for p in self.root.iterdir() if p.is_dir()})

    def _alias_target(self) -> str | None:
        try:
            return self.alias_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _point_alias(self, collection: str) -> None:
        write_atomically(self.alias_file, collection)

    def _open(self, collection: str) -> EdgeIndex:
        return EdgeIndex(self.root, collection, self.settings)

    def close(self) -> None:
        """Nothing to release: each index holds its own folder."""

    def place(self, collection: str) -> str:
        return str(current_folder(self.root, collection))

    def _folders(self) -> dict[str, list[Path]]:
        """Each version's folders: the first (`products__v1`) and its copies (`products__v1.g3`)."""
        found: dict[str, list[Path]] = {version: [] for version in self.versions()}
        for path in self.root.iterdir() if self.root.is_dir() else []:
            version = path.name.split(GENERATION)[0]
            if version in found and path.is_dir() and not path.is_symlink():
                found[version].append(path)
        return found

    def unnamed(self) -> set[str]:
        """Each version is the folder its pointer names (its first folder without a pointer). A pointer
        that names no folder keeps every folder of that version: the store is damaged, and which
        folder holds the data is not guessed."""
        unnamed: set[str] = set()
        for version, folders in self._folders().items():
            named = current_folder(self.root, version)
            if named.is_dir():
                unnamed.update(str(f) for f in folders if f != named)
        return unnamed

    def _drop(self, collection: str) -> None:
        """Its folders, its pointer, its metadata (a crash midway leaves a version that the next restore
        or reindex rebuilds)."""
        for folder in self._folders().get(collection, []):
            shutil.rmtree(folder, ignore_errors=True)
        pointer(self.root, collection).unlink(missing_ok=True)
        (self.root / f"{collection}.json").unlink(missing_ok=True)

    def sweep_temporaries(self) -> list[str]:
        # Only the names visrec replaces in the root: the alias, each version's metadata and pointer, the
        # owner marker (`fs.replacing`'s `.NAME.XXXXXXXX.tmp`).
        name = re.escape(self.name)
        swept = sweep_temporaries(self.root, rf"{name}(\.alias|\.owner\.json|__v[0-9]+\.(json|current))")
        if swept:
            log.info("removed what killed writers left in %s: %s", self.root, ", ".join(swept))
        return swept

    def remove(self, places: Iterable[str]) -> None:
        for place in places:
            log.info("removing %s: nothing names it any longer", place)
            shutil.rmtree(place, ignore_errors=True)
