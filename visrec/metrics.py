"""Evaluation metrics: top-k classification accuracy and retrieval precision@k / mAP@k.

Retrieval metrics take the categories of each query's ranked neighbours (nearest first); a neighbour is
relevant when its category is the query's. Pure functions on arrays, so they are tested by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the retrieval metrics serve the reindex gate, which must not import torch
    import torch


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 3)
) -> dict[int, float]:
    """Share of rows whose target is among the k highest logits, for each k (capped at the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == targets.unsqueeze(1)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def relevance(neighbour_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, K) booleans: is neighbour j of query i in the query's category."""
    return np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]


def precision_at_k(relevant: np.ndarray, k: int) -> float:
    """Mean over queries of the share of relevant items among the first k neighbours.

    Raises `ValueError` when fewer than k neighbours were retrieved: the figure would be inflated.
    """
    if relevant.shape[1] < k:
        raise ValueError(f"precision@{k} needs {k} neighbours per query, got {relevant.shape[1]}")
    return float(relevant[:, :k].mean())


def average_precision_at_k(relevant: np.ndarray, k: int, n_relevant: np.ndarray) -> float:
    """mAP@k: mean over queries of sum_{i<=k} P@i * rel_i / min(k, R).

    R (`n_relevant`, one per query) is how many relevant items the gallery holds; dividing by min(k, R)
    rather than by the hits found means a query that finds one relevant item at rank 1 and nothing
    else scores 1/k, not 1. Queries with R = 0 score 0.
    """
    if relevant.shape[1] < k:
        raise ValueError(f"mAP@{k} needs {k} neighbours per query, got {relevant.shape[1]}")
    rel = relevant[:, :k].astype(np.float64)
    precision_at_i = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    denominator = np.minimum(k, np.asarray(n_relevant))
    ap = np.divide(
        (precision_at_i * rel).sum(axis=1), denominator, out=np.zeros(len(rel)), where=denominator > 0
    )
    return float(ap.mean())


def retrieval_metrics(
    neighbour_labels: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, k: int = 10
) -> dict[str, float]:
    """precision@1, precision@k and mAP@k of ranked neighbours (Q, >=k) against the gallery's labels."""
    relevant = relevance(neighbour_labels, query_labels)
    counts = np.bincount(np.asarray(gallery_labels), minlength=int(np.max(query_labels)) + 1)
    return {
        "p@1": precision_at_k(relevant, 1),
        f"p@{k}": precision_at_k(relevant, k),
        f"map@{k}": average_precision_at_k(relevant, k, counts[np.asarray(query_labels)]),
    }
