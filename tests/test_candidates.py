"""From cache rows to student pairs (pipeline/candidates.py): hand-made rows and a real cache.

.venv/bin/python -m pytest tests/test_candidates.py -x -q
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.candidates import CACHE_COLUMNS, cache_batches, choose, drawn_batch, gather_pairs
from pipeline.shards import cache_schema, read_manifest
from pipeline.streaming import shuffled_batches

torch.set_num_threads(1)
GROUP_SIZE, KEEP, ROUNDS = 16, 4, 2  # 64 train images: 4 groups per round, 128 rows per round


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tiny_cache):
    return tiny_cache["cache"]


def all_rows(cache_dir) -> pa.RecordBatch:
    names = [entry.name for entry in read_manifest(cache_dir).shards]
    table = pa.concat_tables([pq.read_table(cache_dir / name) for name in names])
    return table.combine_chunks().to_batches()[0]


def hand_made(dictionary: list[str]) -> pa.RecordBatch:
    """Two rows of a G = 5 cache: a tr query (image 7) and an ir query (caption 80).

    `dictionary` is the order of the direction dictionary, so a reader that used its integer
    codes instead of the strings would read the wrong direction for one of the orders.
    """
    schema = cache_schema(5, 2)
    candidate_ids = [[70, 81, 92, 103, 114], [8, 7, 9, 6, 5]]
    candidate_logits = [[0.5, 2.0, -1.0, 0.0, 3.0], [1.5, 1.0, 4.0, -2.0, 0.25]]
    codes = [dictionary.index("tr"), dictionary.index("ir")]
    arrays = {
        "direction": pa.DictionaryArray.from_arrays(
            pa.array(codes, pa.int8()), pa.array(dictionary)
        ),
        "query_id": pa.array([7, 80], pa.int64()),
        "candidate_ids": pa.array(candidate_ids, schema.field("candidate_ids").type),
        "candidate_logits": pa.array(candidate_logits, schema.field("candidate_logits").type),
    }
    return pa.RecordBatch.from_arrays([arrays[name] for name in CACHE_COLUMNS], names=CACHE_COLUMNS)


# ----------------------------------------------------------------------------- hand-made rows


@pytest.mark.parametrize("dictionary", [["tr", "ir"], ["ir", "tr"]])
def test_drawn_batch_pairs_by_direction(dictionary):
    drawn = drawn_batch(hand_made(dictionary), candidates=3)

    # tr: the query image with the first three candidate captions, in draw order
    # ir: the first three candidate images with the query caption
    assert drawn.image_ids.tolist() == [[7, 7, 7], [8, 7, 9]]
    assert drawn.caption_ids.tolist() == [[70, 81, 92], [80, 80, 80]]
    assert drawn.teacher_logits.tolist() == [[0.5, 2.0, -1.0], [1.5, 1.0, 4.0]]
    assert drawn.teacher_logits.dtype == torch.float32
    assert drawn.image_ids.dtype == drawn.caption_ids.dtype == torch.long
    assert drawn.is_tr.tolist() == [True, False]


def test_drawn_batch_of_all_candidates_owns_its_logits():
    batch = hand_made(["tr", "ir"])
    drawn = drawn_batch(batch, candidates=5)
    assert drawn.caption_ids[0].tolist() == [70, 81, 92, 103, 114]
    assert drawn.image_ids[1].tolist() == [8, 7, 9, 6, 5]
    drawn.teacher_logits[0, 0] = 9.0  # a copy: the cache batch must not change
    assert batch.column("candidate_logits")[0].as_py()[0] == 0.5


def test_gather_pairs_picks_the_columns_of_each_row():
    drawn = drawn_batch(hand_made(["tr", "ir"]), candidates=5)
    columns = torch.tensor([[0, 4], [0, 2]])
    image_ids, caption_ids = gather_pairs(drawn, columns)
    assert image_ids.tolist() == [[7, 7], [8, 9]]
    assert caption_ids.tolist() == [[70, 114], [80, 80]]


def test_choose_teacher_and_random_on_hand_made_rows():
    logits = drawn_batch(hand_made(["tr", "ir"]), candidates=5).teacher_logits
    columns, kept = choose(logits, 3, "teacher", adjust=True)
    # row 0: negatives best first are columns 4 (3.0), 1 (2.0); KA gives the top-3 scores
    assert columns.tolist() == [[0, 4, 1], [0, 2, 1]]
    assert kept.tolist() == [[3.0, 2.0, 0.5], [4.0, 1.5, 1.0]]
    _, own = choose(logits, 3, "teacher", adjust=False)
    assert own.tolist() == [[0.5, 3.0, 2.0], [1.5, 4.0, 1.0]]

    for adjust in (True, False):  # random candidates keep their own scores either way
        columns, kept = choose(logits, 3, "random", adjust=adjust)
        assert columns.tolist() == [[0, 1, 2], [0, 1, 2]]
        assert torch.equal(kept, logits[:, :3])


# ----------------------------------------------------------------------------- a real cache


def test_first_candidates_are_kept_in_draw_order(built):
    rows = all_rows(built)
    stored = np.stack(rows.column("candidate_ids").to_numpy(zero_copy_only=False))
    logits = np.stack(rows.column("candidate_logits").to_numpy(zero_copy_only=False))
    drawn = drawn_batch(rows, candidates=8)
    candidate_side = torch.where(drawn.is_tr[:, None], drawn.caption_ids, drawn.image_ids)
    query_side = torch.where(drawn.is_tr[:, None], drawn.image_ids, drawn.caption_ids)

    assert candidate_side.tolist() == stored[:, :8].tolist()
    assert torch.equal(drawn.teacher_logits, torch.from_numpy(logits[:, :8]))
    query_ids = rows.column("query_id").to_numpy()
    assert (query_side == torch.tensor(query_ids)[:, None]).all()
    assert drawn.is_tr.sum() == len(query_ids) // 2  # both directions, one row each per pair


def test_teacher_choice_over_all_candidates_reproduces_the_cached_top_k(built):
    """Oracle: the stored KA top M' + 1 were computed in the teacher stage from the same G."""
    rows = all_rows(built)
    drawn = drawn_batch(rows, candidates=GROUP_SIZE)
    columns, kept = choose(drawn.teacher_logits, KEEP, "teacher", adjust=True)
    image_ids, caption_ids = gather_pairs(drawn, columns)
    candidate_side = torch.where(drawn.is_tr[:, None], caption_ids, image_ids)

    topk_ids = np.stack(rows.column("topk_ids").to_numpy(zero_copy_only=False))
    topk_logits = np.stack(rows.column("topk_logits").to_numpy(zero_copy_only=False))
    assert candidate_side.tolist() == topk_ids.tolist()
    assert torch.equal(kept, torch.from_numpy(topk_logits))
    positives = torch.tensor(rows.column("positive_id").to_numpy())
    assert torch.equal(candidate_side[:, 0], positives)
    assert (drawn.teacher_logits.argmax(dim=1) != 0).any(), "no genetic error: a weak oracle"


def test_random_choice_is_the_first_keep_in_draw_order(built):
    rows = all_rows(built)
    drawn = drawn_batch(rows, candidates=GROUP_SIZE)
    columns, kept = choose(drawn.teacher_logits, KEEP, "random", adjust=True)
    image_ids, caption_ids = gather_pairs(drawn, columns)
    assert torch.equal(image_ids, drawn.image_ids[:, :KEEP])
    assert torch.equal(caption_ids, drawn.caption_ids[:, :KEEP])
    assert torch.equal(kept, drawn.teacher_logits[:, :KEEP])


def test_cache_batches_cover_one_round_once(built):
    """One epoch's stream: every (direction, query) of the round exactly once, M + 1 wide."""

    def reader():
        return shuffled_batches(
            built, seed=3, buffer_rows=64, batch_rows=24, columns=CACHE_COLUMNS, rounds=[1]
        )

    seen = []
    for drawn in cache_batches(reader, candidates=6):
        assert drawn.image_ids.shape[1] == drawn.caption_ids.shape[1] == 6
        query = torch.where(drawn.is_tr, drawn.image_ids[:, 0], drawn.caption_ids[:, 0])
        seen += list(zip(drawn.is_tr.tolist(), query.tolist()))
    assert len(seen) == len(set(seen)) == 2 * 64  # per train image a tr and an ir query
