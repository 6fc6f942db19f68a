"""DS/KA candidate selection, positive rank, entropy and the uncertainty weights."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.selection import (
    entropy,
    positive_rank,
    reversed_weights,
    select_candidates,
    uncertainty_weights,
)


def reference_selection(row: list[float], keep: int, adjust: bool) -> tuple[list, list]:
    """Python-loop DS/KA for one query: stable sort of the negatives, column order on ties."""
    negatives = sorted(range(1, len(row)), key=lambda j: (-row[j], j))[: keep - 1]
    columns = [0, *negatives]
    scores = sorted(row, reverse=True)[:keep] if adjust else [row[j] for j in columns]
    return columns, scores


@pytest.mark.parametrize(
    ("row", "columns", "adjusted", "own"),
    [
        # Positive second-best: KA hands it the top score, negatives shift down one place.
        ([1.0, 3.0, 0.0, 2.0], [0, 1, 3], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]),
        # Positive outside the top 3: the lowest of the top-3 negatives (column 2) drops out,
        # but its score 1 stays in the adjusted distribution.
        ([0.0, 3.0, 1.0, 2.0], [0, 1, 3], [3.0, 2.0, 1.0], [0.0, 3.0, 2.0]),
        # Teacher already right: KA changes nothing.
        ([5.0, 3.0, 1.0, 2.0], [0, 1, 3], [5.0, 3.0, 2.0], [5.0, 3.0, 2.0]),
        # Tied negatives: the earlier-drawn ones (columns 1, 2) win over column 3.
        ([1.0, 2.0, 2.0, 2.0, 0.0], [0, 1, 2], [2.0, 2.0, 2.0], [1.0, 2.0, 2.0]),
    ],
)
def test_hand_worked_selection(row, columns, adjusted, own):
    logits = torch.tensor([row])
    kept, kept_scores = select_candidates(logits, keep=3, adjust=True)
    assert kept.dtype == torch.long
    assert kept.tolist() == [columns]
    assert kept_scores.tolist() == [adjusted]
    kept_plain, own_scores = select_candidates(logits, keep=3, adjust=False)
    assert kept_plain.tolist() == [columns]
    assert own_scores.tolist() == [own]


@pytest.mark.parametrize(("n_candidates", "keep"), [(2, 2), (5, 2), (8, 4), (64, 8), (16, 16)])
def test_matches_reference_with_ties(n_candidates, keep):
    generator = torch.Generator().manual_seed(n_candidates * 100 + keep)
    logits = torch.randint(0, 4, (50, n_candidates), generator=generator).float()
    for adjust in (True, False):
        kept, kept_scores = select_candidates(logits, keep, adjust=adjust)
        assert kept.shape == kept_scores.shape == (50, keep)
        for q, row in enumerate(logits.tolist()):
            columns, scores = reference_selection(row, keep, adjust)
            assert kept[q].tolist() == columns
            assert kept_scores[q].tolist() == scores


def test_adjusted_scores_keep_the_top_set_and_give_the_positive_the_max():
    logits = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    kept, adjusted = select_candidates(logits, keep=8)
    assert torch.equal(adjusted[:, 0], logits.max(dim=1).values)
    assert torch.equal(adjusted, logits.topk(8, dim=1).values)
    assert (kept[:, 0] == 0).all()
    assert (kept[:, 1:] > 0).all()
    # Selected negatives are the 7 best negatives, best first.
    negatives = torch.gather(logits, 1, kept[:, 1:])
    assert torch.equal(negatives, logits[:, 1:].topk(7, dim=1).values)


@pytest.mark.parametrize("keep", [1, 0, 5])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        select_candidates(torch.zeros(3, 4), keep)


def test_nan_and_shape_are_named():
    logits = torch.zeros(3, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contains NaN.*row 2"):
        select_candidates(logits, 2)
    with pytest.raises(ValueError, match="teacher_logits must be .* matrix"):
        select_candidates(torch.zeros(4), 2)


def test_positive_rank_is_pessimistic():
    logits = torch.tensor(
        [
            [1.0, 3.0, 0.0, 2.0],  # two negatives above -> 3
            [5.0, 3.0, 1.0, 2.0],  # best -> 1
            [2.0, 2.0, 1.0, 2.0],  # ties with two negatives -> 3
            [0.0, 0.0, 0.0, 0.0],  # all tied -> last
        ]
    )
    assert positive_rank(logits).tolist() == [3, 1, 3, 4]


def test_entropy_known_values():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
            [math.log(2.0), 0.0, 0.0, -math.inf],  # p = (1/2, 1/4, 1/4, 0): 1.5 ln 2
            [0.0, -math.inf, -math.inf, -math.inf],  # certain: 0, not NaN
        ]
    )
    expected = torch.tensor([math.log(4.0), 1.0397207708399179, 0.0])
    torch.testing.assert_close(entropy(logits), expected)


def test_entropy_matches_categorical():
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy(logits), expected)


def test_uncertainty_weights_known_values():
    w = uncertainty_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))
    # c_1 = e^(0.75^2) / (e^(0.75^2) + e^(0.25^2)) = 1.755055 / 2.819549
    torch.testing.assert_close(reversed_weights(w), torch.tensor([0.6224593, 0.3775407]))


def test_weights_are_positive_and_sum_to_one():
    u = entropy(torch.randn(32, 8, generator=torch.Generator().manual_seed(2)))
    w = uncertainty_weights(u)
    c = reversed_weights(w)
    for weights in (w, c):
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    # The least uncertain query gets the smallest w and the largest c.
    assert w.argmin() == u.argmin() == c.argmax()


def test_all_zero_uncertainty_gives_uniform_weights():
    torch.testing.assert_close(uncertainty_weights(torch.zeros(4)), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match=r"\(K,\) vector"):
        uncertainty_weights(torch.zeros(2, 2))
