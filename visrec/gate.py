"""The quality gate of a reindex: the new version of the collection measured against the live one on the
same query products (`visrec.evaluation`), each one's figures recorded in its metadata, and whether the
new one may go live."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrec import evaluation
from visrec.config import GateSettings
from visrec.errors import IndexUnavailable, ModelError
from visrec.evaluation import Quality
from visrec.index import Store, VectorIndex
from visrec.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """What the quality gate found: both versions' figures on the same queries, or why there were none."""

    verdict: str  # "passed", "forced", "refused", or "nothing to compare"
    note: str  # the query set, or why nothing was compared
    max_drop: float
    live: Quality | None = None
    new: Quality | None = None
    seconds: float = 0.0  # the whole gate: reading both versions, the queries, recording the figures

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "note": self.note,
            "max_quality_drop": self.max_drop,
            "live": self.live.to_dict() if self.live else None,
            "new": self.new.to_dict() if self.new else None,
            "seconds": round(self.seconds, 2),
        }


def quality_gate(
    store: Store,
    live: str | None,
    new: VectorIndex,
    manifest: Manifest,
    gate: GateSettings,
    force: bool = False,
    held: Mapping[str, VectorIndex] | None = None,
) -> GateResult:
    """Measure the `new` version (built by `manifest`'s model) against the `live` one (None: there is
    none yet) on the same query products, record each one's figures in its metadata, and say whether the
    new one may go live. Raises `IndexUnavailable` if the live version cannot be opened, unless `force`."""
    dim = manifest.embedding_dim
    new_categories = evaluation.categories(new)
    if live is None:
        return _measure_alone(
            new, manifest, new_categories, gate, "the first version: nothing to compare with"
        )
    stack = ExitStack()
    try:
        current = stack.enter_context(store.opened(live, held or {}))
    except IndexUnavailable as exc:
        if not force:
            raise IndexUnavailable(
                f"{new.collection} is built but not live: the quality gate cannot read the live {live} "
                f"({exc}). Rerun when it is free (nothing is re-embedded), or pass --force to switch "
                "without comparing"
            ) from exc
        return _measure_alone(new, manifest, new_categories, gate, f"--force, and the live {live} is in use")
    with stack:
        if not current.exists():
            return _measure_alone(new, manifest, new_categories, gate, f"the live {live} is empty")
        live_categories = evaluation.categories(current)
        live_metadata = current.metadata()
        queries = evaluation.choose_queries(
            live_categories,
            new_categories,
            _untrained(live_metadata, manifest),
            gate.queries,
            gate.seed,
        )
        if not queries.products:
            return GateResult(
                "nothing to compare", "no product has a category in both versions", gate.max_quality_drop
            )
        live_model = live_metadata.get("model_version", "unknown")
        before = evaluation.measure(current, live_model, queries, live_categories)
        after = evaluation.measure(new, manifest.model_version, queries, new_categories)
        evaluation.record(current, dim, before)
        evaluation.record(new, dim, after, compared_with=before)
    worse = evaluation.worse_by(after, before)
    verdict = "passed" if worse <= gate.max_quality_drop else "forced" if force else "refused"
    log.info(
        "quality gate %s: live %s, new %s (%s, %.1f s)",
        verdict,
        before.line(),
        after.line(),
        queries.describe(),
        before.seconds + after.seconds,
    )
    return GateResult(verdict, queries.describe(), gate.max_quality_drop, before, after)


def _measure_alone(
    index: VectorIndex, manifest: Manifest, categories: dict[str, str], gate: GateSettings, why: str
) -> GateResult:
    """The new version's figures alone (recorded for `status`), when there is nothing to compare with."""
    queries = evaluation.choose_queries(
        categories, categories, evaluation.heldout_products(manifest), gate.queries, gate.seed
    )
    if not queries.products:
        return GateResult("nothing to compare", f"{why}; no product has a category", gate.max_quality_drop)
    quality = evaluation.measure(index, manifest.model_version, queries, categories)
    evaluation.record(index, manifest.embedding_dim, quality)
    return GateResult(
        "nothing to compare", f"{why} ({queries.describe()})", gate.max_quality_drop, new=quality
    )


def _untrained(live_metadata: dict[str, str], new: Manifest) -> set[str] | None:
    """The products neither the live version's model nor the new one was trained on, when both manifests
    list their held-out products (and the live one's artefact is readable here); else None."""
    if "artefact" not in live_metadata:
        return None
    try:
        live_manifest = read_manifest(Path(live_metadata["artefact"]))
    except ModelError:
        return None
    if live_manifest.model_version != live_metadata.get("model_version"):
        return None
    live_heldout, new_heldout = evaluation.heldout_products(live_manifest), evaluation.heldout_products(new)
    if live_heldout is None or new_heldout is None:
        return None
    return live_heldout & new_heldout
