"""One exception hierarchy. The CLI maps each to a one-line message and an exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisrecError(Exception):
    """Base of every error visrec raises on purpose; the message is meant for the user."""

    exit_code = 1


class InvalidSetting(VisrecError):
    """A setting (a VISREC_ variable, a flag) cannot be used as given: a bad value, a port in use."""

    exit_code = 2


class CatalogueError(VisrecError):
    """The catalogue file as a whole cannot be used (missing, unknown format, missing columns)."""

    exit_code = 2


class ImageError(VisrecError):
    """One image cannot be read or decoded; ingestion records it and goes on (a query photo: exit 2)."""

    exit_code = 2


class ModelError(VisrecError):
    """Weights or an exported artefact are missing, corrupt, or not what they claim to be."""

    exit_code = 3


class QualityRefused(VisrecError):
    """A new collection version retrieves worse than the live one (the reindex quality gate)."""

    exit_code = 3


class Refused(VisrecError):
    """A command the store's state does not allow as asked: nothing older to roll back to, a new version
    that lacks products; it says how to go on. Nothing was changed."""

    exit_code = 2


class WritesWouldBeLost(Refused):
    """A version change would drop products written since the version it restores (unless forced)."""


class OutputUnwritable(VisrecError):
    """A file the user asked for (a report page) cannot be written there: a folder, no such folder, no
    permission, a full disk. Nothing else was changed."""

    exit_code = 2


class IndexUnavailable(VisrecError):
    """The vector store cannot be reached or opened (server down, embedded store in use)."""

    exit_code = 4


class DiskFull(IndexUnavailable):
    """The embedded store's disk is (nearly) full: writes are refused, nothing of them was written."""


class CollectionMissing(VisrecError):
    """The collection does not exist yet: run `visrec sync` first."""

    exit_code = 4


class InvalidQuery(VisrecError):
    """A query is malformed: unknown product, bad k, wrong vector size."""

    exit_code = 2


class InvalidFilter(InvalidQuery):
    """A metadata filter is malformed (e.g. price_min above price_max)."""


class NoMatch(InvalidFilter):
    """One condition of a filter matches no product at all (a misspelt value or field): the message
    names what there is."""


class NotFound(InvalidQuery):
    """The product asked for is not in the index."""


class PointRejected(VisrecError):
    """The store refused one point's data (e.g. a payload value it cannot hold); the store itself works."""


class WriteForbidden(VisrecError):
    """A write route asked without the write key (or with writes off on this service)."""

    exit_code = 2


class WritesBusy(IndexUnavailable):
    """Too many writes are waiting for the service's writer: retry later."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The one of `known` that `name` most likely misspells (case aside), or None: for messages that
    say "did you mean …"."""
    by_folded = {str(k).casefold(): str(k) for k in known}
    found = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=0.6)
    return by_folded[found[0]] if found else None
