"""Training data: the categorised products of a catalogue split, stratified and seeded, into the images
that fit the model, the validation images that choose its epochs, and the held-out images that measure it
once. No image is in two splits (tests/test_train.py checks it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from visrec.catalogue import Catalogue
from visrec.config import TrainSettings
from visrec.errors import CatalogueError


@dataclass(frozen=True)
class Split:
    """Image references, their class numbers and their products' ids, aligned."""

    refs: list[str]
    labels: list[int]
    ids: list[str] = field(default_factory=list)

    def take(self, positions: Sequence[int]) -> Split:
        return Split(
            [self.refs[i] for i in positions],
            [self.labels[i] for i in positions],
            [self.ids[i] for i in positions] if self.ids else [],
        )


def split_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of positions into (train, held-out); every class with ≥2 items is in both."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    train, held_out = [], []
    for positions in by_class.values():
        rng.shuffle(positions)
        n_out = min(len(positions) - 1, max(1, round(len(positions) * fraction))) if len(positions) > 1 else 0
        held_out += positions[:n_out]
        train += positions[n_out:]
    return sorted(train), sorted(held_out)


def split_data(
    catalogue: Catalogue, cfg: TrainSettings, test: Catalogue | None = None
) -> tuple[list[str], Split, Split, Split]:
    """(classes, fit, validation, held-out). The held-out split is `test` when given, else a stratified
    `cfg.holdout` share of the catalogue; validation is a stratified `cfg.validation` share of the rest.
    Raises `CatalogueError` for fewer than 2 categories, a test category unseen in training, or too
    few products to hold any out."""
    labelled = [p for p in catalogue.products if p.category]
    classes = sorted({p.category for p in labelled if p.category})
    if len(classes) < 2:
        raise CatalogueError(f"training needs at least 2 categories; {catalogue.path} has {len(classes)}")
    data = Split(
        [catalogue.photo_refs(p)[0] for p in labelled],
        [classes.index(p.category or "") for p in labelled],
        [p.id for p in labelled],
    )
    if test is None:
        train_pos, test_pos = split_holdout(data.labels, cfg.holdout, cfg.seed)
        trainable, held_out = data.take(train_pos), data.take(test_pos)
    else:
        tested = [p for p in test.products if p.category]
        unseen = sorted({p.category or "" for p in tested} - set(classes))
        if unseen:
            raise CatalogueError(f"{test.path}: categories not in the training catalogue: {unseen[:5]}")
        trainable = data
        held_out = Split(
            [test.photo_refs(p)[0] for p in tested],
            [classes.index(p.category or "") for p in tested],
            [p.id for p in tested],
        )
    if not held_out.refs:
        raise CatalogueError("too few products per category to hold any out for evaluation")
    if not cfg.validation:
        return classes, trainable, Split([], []), held_out
    fit_pos, val_pos = split_holdout(trainable.labels, cfg.validation, cfg.seed + 1)
    return classes, trainable.take(fit_pos), trainable.take(val_pos), held_out
