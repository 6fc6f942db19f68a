"""Teacher knowledge of one group: from its G x G logit matrix to cache rows, both directions.

Row i of the matrix ranks the group's captions for image i (text retrieval); column j ranks its
images for caption j (image retrieval). For every query the G candidates are stored in *draw
order*: the positive first, then the other G - 1 in a seeded random order, so the first M + 1
of them are the positive and M random negatives, whatever M a student picks later.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.selection import entropy, positive_rank, select_candidates
from pipeline.shards import CacheError, rows_to_table


def draw_orders(group_size: int, rng: np.random.Generator) -> np.ndarray:
    """(G, G) int: row q is query q's candidate order, q first, the others shuffled."""
    orders = np.empty((group_size, group_size), dtype=np.int64)
    for query in range(group_size):
        others = np.delete(np.arange(group_size), query)
        orders[query] = np.concatenate([[query], rng.permutation(others)])
    return orders


def direction_rows(
    logits: np.ndarray,
    query_ids: np.ndarray,
    candidate_ids: np.ndarray,
    orders: np.ndarray,
    keep: int,
) -> dict[str, np.ndarray]:
    """Cache columns for G queries whose logits are the rows of `logits` (G, G).

    `query_ids` (G,) and `candidate_ids` (G,) are aligned with rows and columns; query q's
    positive is candidate q. Returns arrays for `pipeline.shards.rows_to_table`.
    """
    drawn_logits = np.take_along_axis(logits, orders, axis=1).astype(np.float32)  # (G, G)
    drawn_ids = candidate_ids[orders]  # (G, G)
    return {
        "query_ids": query_ids,
        "positive_ids": candidate_ids.copy(),
        "candidate_ids": drawn_ids,
        "candidate_logits": drawn_logits,
        **derived_columns(drawn_ids, drawn_logits, keep),
    }


def derived_columns(
    candidate_ids: np.ndarray, candidate_logits: np.ndarray, keep: int
) -> dict[str, np.ndarray]:
    """What the cache derives from (Q, G) draw-order rows (column 0 the positive): the
    knowledge-adjusted top `keep` ids and scores, the positive's rank, the entropy over the
    kept scores and the positive's probability over all G."""
    teacher = torch.from_numpy(np.asarray(candidate_logits, dtype=np.float32))
    kept_columns, kept_logits = select_candidates(teacher, keep, adjust=True)  # (Q, K) each
    return {
        "topk_ids": np.take_along_axis(np.asarray(candidate_ids), kept_columns.numpy(), axis=1),
        "topk_logits": kept_logits.numpy().astype(np.float32),
        "positive_rank": positive_rank(teacher).numpy(),
        "entropy": entropy(kept_logits).numpy().astype(np.float32),
        "positive_prob": torch.softmax(teacher, dim=1)[:, 0].numpy().astype(np.float32),
    }


def group_table(
    group: np.ndarray,
    logits: np.ndarray,
    round_index: int,
    group_id: int,
    keep: int,
    rng: np.random.Generator,
) -> pa.Table:
    """Cache rows (2G) of one group (G, 2) of (image_id, caption_id) scored as `logits` (G, G).

    Raises CacheError naming the first pair when a teacher logit is NaN or infinite.
    """
    image_ids, caption_ids = group[:, 0], group[:, 1]
    bad = np.argwhere(~np.isfinite(logits))  # (n, 2) of (image row, caption column)
    if len(bad):
        row, column = bad[0]
        raise CacheError(
            f"round {round_index}, group {group_id}: the teacher scored image {image_ids[row]} "
            f"with caption {caption_ids[column]} as {logits[row, column]} ({len(bad)} of "
            f"{logits.size} logits non-finite); check the teacher's weights"
        )
    size = len(group)
    tr = direction_rows(logits, image_ids, caption_ids, draw_orders(size, rng), keep)
    ir = direction_rows(logits.T, caption_ids, image_ids, draw_orders(size, rng), keep)
    tables = [
        rows_to_table(round_index, direction, group_id, **columns)
        for direction, columns in (("tr", tr), ("ir", ir))
    ]
    return pa.concat_tables(tables)
