"""From cached teacher knowledge to student batches: pick M + 1 candidates, then M' + 1.

A cache row holds G candidates in draw order (the positive first, then random negatives), so
its first M + 1 are the positive and M random negatives for any M < G. Selection then keeps
M' + 1 of them: the teacher's best (dynamic data selection, with or without knowledge
adjustment) or simply the first M' + 1 in draw order (random candidates, as the baselines use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.selection import select_candidates

CACHE_COLUMNS = ["direction", "query_id", "candidate_ids", "candidate_logits"]


@dataclass
class DrawnBatch:
    """K cache rows cut to their first M + 1 candidates, as (image, caption) pairs."""

    image_ids: torch.Tensor  # (K, M + 1) long
    caption_ids: torch.Tensor  # (K, M + 1) long
    teacher_logits: torch.Tensor  # (K, M + 1) float32, the cached teacher logits
    is_tr: torch.Tensor  # (K,) bool: text-retrieval query (candidates are captions)


def _matrix(column: pa.Array, rows: int) -> np.ndarray:
    """A fixed-size list column as a (rows, width) numpy array, without Python loops."""
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(rows, -1)


def drawn_batch(batch: pa.RecordBatch, candidates: int) -> DrawnBatch:
    """The pairs of a cache batch, keeping the first `candidates` (M + 1) in draw order."""
    rows = batch.num_rows
    ids = _matrix(batch.column("candidate_ids"), rows)[:, :candidates]  # (K, M + 1)
    logits = _matrix(batch.column("candidate_logits"), rows)[:, :candidates]
    query = batch.column("query_id").to_numpy()[:, None].repeat(candidates, axis=1)
    is_tr = np.asarray(batch.column("direction").to_pylist()) == "tr"
    image_ids = np.where(is_tr[:, None], query, ids)  # tr: the query is the image
    caption_ids = np.where(is_tr[:, None], ids, query)
    return DrawnBatch(
        image_ids=torch.from_numpy(np.ascontiguousarray(image_ids)),
        caption_ids=torch.from_numpy(np.ascontiguousarray(caption_ids)),
        # a copy: with candidates == G the slice is a read-only view of the Arrow buffer
        teacher_logits=torch.from_numpy(np.array(logits, dtype=np.float32, order="C")),
        is_tr=torch.from_numpy(is_tr),
    )


def choose(
    teacher_logits: torch.Tensor, keep: int, selection: str, adjust: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns (K, M' + 1) of the kept candidates and their teacher logits (K, M' + 1).

    `selection="teacher"`: the teacher's top M' + 1 with the positive forced in at column 0
    (KA scores when `adjust`); `"random"`: the first M' + 1 in draw order with their own logits.
    """
    if selection == "teacher":
        return select_candidates(teacher_logits, keep, adjust=adjust)
    columns = torch.arange(keep).expand(len(teacher_logits), keep)
    return columns, teacher_logits[:, :keep]


def gather_pairs(drawn: DrawnBatch, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_ids, caption_ids), each (K, M' + 1), of the kept columns."""
    return drawn.image_ids.gather(1, columns), drawn.caption_ids.gather(1, columns)


def cache_batches(
    reader: Callable[[], Iterator[pa.RecordBatch]], candidates: int
) -> Iterator[DrawnBatch]:
    """Student batches from a stream of cache record batches."""
    for batch in reader():
        yield drawn_batch(batch, candidates)
