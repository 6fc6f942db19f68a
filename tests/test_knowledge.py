"""Teacher knowledge of one group (pipeline/knowledge.py): known values on a hand-made matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.knowledge import draw_orders, group_table
from pipeline.shards import CacheError

torch.set_num_threads(1)

# A 4 x 4 group. Ids differ from positions (and images from captions), so a table that used a
# position where an id belongs would fail. LOGITS[i, j] = teacher score of image i, caption j.
IMAGE_IDS = np.array([10, 11, 12, 13])
CAPTION_IDS = np.array([20, 21, 22, 23])
GROUP = np.stack([IMAGE_IDS, CAPTION_IDS], axis=1)  # (G, 2)
LOGITS = np.array(
    [
        [4.0, 1.0, 2.0, 0.0],  # image 10: positive best
        [3.0, 2.0, 5.0, 1.0],  # image 11: captions 22 and 20 above the positive
        [0.0, 1.0, 1.0, 1.0],  # image 12: positive tied with captions 21 and 23
        [2.0, 0.0, 1.0, 6.0],  # image 13: positive best
    ],
    dtype=np.float32,
)
# Worked out by hand (pessimistic ties: an equal negative ranks above the positive).
# TR row i is LOGITS[i]; IR query j (caption 20 + j) is column LOGITS[:, j].
TR_RANKS = [1, 3, 3, 1]
IR_RANKS = [1, 1, 4, 1]  # column 2 is [2, 5, 1, 1]: positive 1 tied with image 13
KEEP = 3


def table_columns(keep: int = KEEP, seed: int = 0, round_index: int = 2, group_id: int = 5):
    table = group_table(GROUP, LOGITS, round_index, group_id, keep, np.random.default_rng(seed))
    return table.to_pydict()


def direction(columns: dict, name: str) -> list[dict]:
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [row for row in rows if row["direction"] == name]


def score(name: str, query_id: int, candidate_id: int) -> float:
    """The matrix entry behind a (query, candidate) pair of direction `name`."""
    if name == "tr":
        return float(LOGITS[query_id - 10, candidate_id - 20])
    return float(LOGITS[candidate_id - 10, query_id - 20])


def test_rows_both_directions_and_scalar_columns():
    columns = table_columns()
    assert len(columns["query_id"]) == 2 * len(GROUP)
    assert columns["direction"] == ["tr"] * 4 + ["ir"] * 4
    assert set(columns["round"]) == {2} and set(columns["group_id"]) == {5}

    tr, ir = direction(columns, "tr"), direction(columns, "ir")
    assert [row["query_id"] for row in tr] == IMAGE_IDS.tolist()
    assert [row["positive_id"] for row in tr] == CAPTION_IDS.tolist()
    assert [row["query_id"] for row in ir] == CAPTION_IDS.tolist()
    assert [row["positive_id"] for row in ir] == IMAGE_IDS.tolist()


@pytest.mark.parametrize("name", ["tr", "ir"])
def test_candidate_logits_follow_the_matrix_in_draw_order(name: str):
    candidates = CAPTION_IDS if name == "tr" else IMAGE_IDS
    for row in direction(table_columns(), name):
        # position 0 is the positive, the rest a permutation of the other candidates
        assert row["candidate_ids"][0] == row["positive_id"]
        assert sorted(row["candidate_ids"]) == sorted(candidates.tolist())
        expected = [score(name, row["query_id"], cid) for cid in row["candidate_ids"]]
        assert row["candidate_logits"] == pytest.approx(expected, abs=0)


def test_ir_queries_are_matrix_columns_not_rows():
    # caption 22 is column 2, [2, 5, 1, 1] by image; row 2 would be [0, 1, 1, 1]
    ir = {row["query_id"]: row for row in direction(table_columns(), "ir")}
    row = ir[22]
    by_image = dict(zip(row["candidate_ids"], row["candidate_logits"]))
    assert by_image == {10: 2.0, 11: 5.0, 12: 1.0, 13: 1.0}


def test_positive_rank_counts_ties_against_the_positive():
    columns = table_columns()
    assert [row["positive_rank"] for row in direction(columns, "tr")] == TR_RANKS
    assert [row["positive_rank"] for row in direction(columns, "ir")] == IR_RANKS


def test_topk_knowledge_adjusted():
    tr = {row["query_id"]: row for row in direction(table_columns(), "tr")}
    # image 10 [4, 1, 2, 0]: no error; positive, then captions 22 (2) and 21 (1)
    assert tr[10]["topk_ids"] == [20, 22, 21]
    assert tr[10]["topk_logits"] == [4.0, 2.0, 1.0]
    # image 11 [3, 2, 5, 1]: genetic error; the positive moves first and takes the top score,
    # the negatives keep their teacher order and each shifts down one score
    assert tr[11]["topk_ids"] == [21, 22, 20]
    assert tr[11]["topk_logits"] == [5.0, 3.0, 2.0]
    # image 12 [0, 1, 1, 1]: three tied negatives, the two drawn first are kept
    drawn_negatives = tr[12]["candidate_ids"][1:]
    assert tr[12]["topk_ids"] == [22] + [c for c in drawn_negatives if c != 20][:2]
    assert tr[12]["topk_logits"] == [1.0, 1.0, 1.0]

    ir = {row["query_id"]: row for row in direction(table_columns(), "ir")}
    # caption 22, column [2, 5, 1, 1]: positive (image 12, score 1) outside the top 3, so the
    # lowest of the top negatives drops out; the values are the top 3 of the column
    assert ir[22]["topk_ids"] == [12, 11, 10]
    assert ir[22]["topk_logits"] == [5.0, 2.0, 1.0]


def test_topk_logits_are_the_largest_scores_sorted():
    for row in direction(table_columns(keep=2), "tr") + direction(table_columns(keep=2), "ir"):
        assert row["topk_ids"][0] == row["positive_id"]
        assert row["topk_logits"] == sorted(row["candidate_logits"], reverse=True)[:2]
        negatives = row["topk_ids"][1:]
        assert row["positive_id"] not in negatives


def entropy_by_hand(scores: list[float]) -> float:
    exps = [math.exp(s) for s in scores]
    total = sum(exps)
    return -sum(e / total * math.log(e / total) for e in exps)


def test_entropy_over_the_kept_scores():
    tr = {row["query_id"]: row for row in direction(table_columns(), "tr")}
    assert tr[12]["entropy"] == pytest.approx(math.log(3), rel=1e-6)  # three equal scores
    assert tr[10]["entropy"] == pytest.approx(entropy_by_hand([4, 2, 1]), rel=1e-5)
    assert tr[11]["entropy"] == pytest.approx(entropy_by_hand([5, 3, 2]), rel=1e-5)
    assert tr[13]["entropy"] == pytest.approx(entropy_by_hand([6, 2, 1]), rel=1e-5)


def test_positive_prob_is_softmax_over_all_candidates():
    rows = direction(table_columns(), "tr") + direction(table_columns(), "ir")
    for row in rows:
        exps = [math.exp(score(row["direction"], row["query_id"], c)) for c in row["candidate_ids"]]
        assert row["positive_prob"] == pytest.approx(exps[0] / sum(exps), rel=1e-5)
    tr = {row["query_id"]: row for row in rows if row["direction"] == "tr"}
    denominator = math.exp(4) + math.exp(1) + math.exp(2) + math.exp(0)
    assert tr[10]["positive_prob"] == pytest.approx(math.exp(4) / denominator, rel=1e-5)


def test_group_table_is_seeded():
    same = table_columns(seed=3), table_columns(seed=3)
    assert same[0] == same[1]
    other = table_columns(seed=4)
    for rows in (slice(0, 4), slice(4, 8)):  # tr, then ir: each direction follows the seed
        assert other["candidate_ids"][rows] != same[0]["candidate_ids"][rows]
    # the draw order changes, the knowledge does not
    assert other["positive_rank"] == same[0]["positive_rank"]
    assert other["entropy"] == same[0]["entropy"]


def test_tr_and_ir_draw_orders_are_drawn_separately():
    size = 8
    group = np.stack([np.arange(size), 100 + np.arange(size)], axis=1)
    logits = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    columns = group_table(group, logits, 0, 0, 3, np.random.default_rng(1)).to_pydict()
    tr_positions = [[c - 100 for c in ids] for ids in columns["candidate_ids"][:size]]
    ir_positions = columns["candidate_ids"][size:]
    assert tr_positions != ir_positions


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_teacher_logits_name_the_pair(bad: float):
    logits = LOGITS.copy()
    logits[2, 1] = bad
    with pytest.raises(CacheError, match=r"round 0, group 7: .*image 12 with caption 21"):
        group_table(GROUP, logits, 0, 7, KEEP, np.random.default_rng(0))


# ----------------------------------------------------------------------------- draw orders


@pytest.mark.parametrize("size", [2, 3, 8, 64])
def test_draw_orders_are_permutations_with_the_query_first(size: int):
    orders = draw_orders(size, np.random.default_rng(0))
    assert orders.shape == (size, size) and orders.dtype == np.int64
    assert (orders[:, 0] == np.arange(size)).all()
    assert (np.sort(orders, axis=1) == np.arange(size)).all()


def test_draw_orders_are_seeded_and_shuffled():
    first = draw_orders(16, np.random.default_rng(5))
    assert (first == draw_orders(16, np.random.default_rng(5))).all()
    assert not (first == draw_orders(16, np.random.default_rng(6))).all()
    # not the identity-with-query-first order: the negatives really are shuffled
    plain = np.array([[q] + [c for c in range(16) if c != q] for q in range(16)])
    assert (first != plain).any(axis=1).sum() >= 14


def test_draw_orders_first_negative_is_uniform():
    # the first M of the G - 1 negatives must be a uniform random subset for every M;
    # position 1 over 800 draws of G = 5: each query's 4 negatives about 200 times each
    rng = np.random.default_rng(0)
    counts = np.zeros((5, 5))
    for _ in range(800):
        orders = draw_orders(5, rng)
        counts[np.arange(5), orders[:, 1]] += 1
    assert (np.diag(counts) == 0).all()
    off_diagonal = counts[~np.eye(5, dtype=bool)]
    assert off_diagonal.min() > 140 and off_diagonal.max() < 260  # expected 200, sd ~12
