"""The evaluation metrics against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visrec.metrics import average_precision_at_k, precision_at_k, relevance, retrieval_metrics, topk_accuracy


def test_topk_accuracy_by_hand() -> None:
    logits = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    targets = torch.tensor([0, 2, 3])
    # row 0: top-1 hit; row 1: target 2 is second; row 2: target 3 is last
    assert topk_accuracy(logits, targets) == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert topk_accuracy(logits[:, :2], torch.tensor([0, 1, 0]), ks=(1, 3))[3] == 1.0  # k capped at 2 classes


# Query A (category 0) finds 0, 1, 0; query B (category 1) finds 0, 0, 1. The gallery holds five
# items of category 0 and one of category 1.
NEIGHBOURS = np.array([[0, 1, 0], [0, 0, 1]])
QUERIES = np.array([0, 1])
GALLERY = np.array([0, 0, 0, 0, 0, 1])


def test_precision_at_k_by_hand() -> None:
    relevant = relevance(NEIGHBOURS, QUERIES)
    assert relevant.tolist() == [[True, False, True], [False, False, True]]
    assert precision_at_k(relevant, 1) == pytest.approx((1 + 0) / 2)
    assert precision_at_k(relevant, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_map_at_k_by_hand() -> None:
    relevant = relevance(NEIGHBOURS, QUERIES)
    # A: (P@1·1 + P@3·1) / min(3, R=5) = (1 + 2/3) / 3 = 5/9.  B: (P@3·1) / min(3, R=1) = 1/3.
    assert average_precision_at_k(relevant, 3, np.array([5, 1])) == pytest.approx((5 / 9 + 1 / 3) / 2)
    # One relevant item found at rank 1 of a gallery holding many scores 1/k, not 1.
    assert average_precision_at_k(np.array([[True, False, False]]), 3, np.array([9])) == pytest.approx(1 / 3)
    # A query whose category the gallery lacks scores 0 instead of dividing by zero.
    assert average_precision_at_k(np.array([[False, False]]), 2, np.array([0])) == 0.0


def test_retrieval_metrics_count_relevant_items_in_the_gallery() -> None:
    metrics = retrieval_metrics(NEIGHBOURS, QUERIES, GALLERY, k=3)
    assert metrics == {
        "p@1": pytest.approx(0.5),
        "p@3": pytest.approx(0.5),
        "map@3": pytest.approx((5 / 9 + 1 / 3) / 2),
    }


def test_too_few_neighbours_is_an_error_not_an_inflated_figure() -> None:
    with pytest.raises(ValueError, match="needs 10 neighbours"):
        retrieval_metrics(NEIGHBOURS, QUERIES, GALLERY, k=10)
