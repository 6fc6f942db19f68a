"""Knowledge-cache format: schema, row validation, shards, manifest, verification, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.knowledge import derived_columns
from pipeline.shards import (
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    CacheError,
    CacheManifest,
    cache_schema,
    check_compatible,
    read_manifest,
    rows_to_table,
    shard_name,
    verify_cache,
    write_manifest,
    write_shard,
)
from pipeline.streaming import (
    ShuffleBuffer,
    _rebatch,
    iter_batches,
    shuffled_batches,
    shuffled_rows,
)

torch.set_num_threads(1)


def random_columns(
    rng: np.random.Generator, queries: int, group_size: int, keep: int, first_id: int = 0
) -> dict[str, np.ndarray]:
    """Consistent rows_to_table arguments (minus round/direction/group_id) for `queries` rows."""
    candidate_ids = first_id + np.arange(queries * group_size).reshape(queries, group_size)
    logits = rng.standard_normal((queries, group_size)).astype(np.float32)
    return {
        "query_ids": first_id + np.arange(queries),
        "positive_ids": candidate_ids[:, 0],
        "candidate_ids": candidate_ids,
        "candidate_logits": logits,
        **derived_columns(candidate_ids, logits, keep),
    }


def make_manifest(group_size: int = 8, keep: int = 3, **changes: object) -> CacheManifest:
    fields = {
        "fingerprints": {"dataset": "d1", "teacher": "t1", "tokenizer": "k1"},
        "group_size": group_size,
        "keep": keep,
        "rounds": 2,
        "seed": 7,
        "code_version": "abc",
        "config": {"lr": 0.1, "data": {"split": "train"}},
    }
    return CacheManifest(**{**fields, **changes})


def make_cache(
    cache_dir: Path,
    rounds: int = 2,
    queries: int = 60,
    group_size: int = 8,
    keep: int = 3,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> CacheManifest:
    """One shard per (round, direction), `queries` rows each, ids unique across the cache."""
    rng = np.random.default_rng(0)
    manifest = make_manifest(group_size, keep, rounds=rounds)
    for round_index in range(rounds):
        for direction in ("tr", "ir"):
            index = len(manifest.shards)
            columns = random_columns(rng, queries, group_size, keep, first_id=index * 10**6)
            table = rows_to_table(round_index, direction, 0, **columns)
            entry = write_shard(table, cache_dir / shard_name(index), row_group_rows)
            manifest.shards.append(entry)
    write_manifest(cache_dir, manifest)
    return manifest


def all_query_ids(batches) -> list[int]:
    return [qid for batch in batches for qid in batch.column("query_id").to_pylist()]


# ----------------------------------------------------------------------------- schema and rows


def test_schema_records_version_and_sizes():
    schema = cache_schema(64, 8)
    assert schema.metadata == {
        b"dcd.schema_version": str(SCHEMA_VERSION).encode(),
        b"dcd.group_size": b"64",
        b"dcd.keep": b"8",
    }
    assert schema.field("candidate_ids").type.list_size == 64
    assert schema.field("topk_logits").type.list_size == 8
    assert schema.field("topk_logits").type.value_type == pa.float32()
    assert pa.types.is_dictionary(schema.field("direction").type)
    assert schema.field("positive_rank").type == pa.int16()
    with pytest.raises(CacheError, match="keep"):
        cache_schema(4, 5)


def test_rows_to_table_keeps_values_and_broadcasts_scalars():
    columns = random_columns(np.random.default_rng(1), 5, 6, 2)
    table = rows_to_table(3, "ir", np.arange(5), **columns)
    assert table.schema.equals(cache_schema(6, 2), check_metadata=True)
    assert table.column("round").to_pylist() == [3] * 5
    assert table.column("direction").to_pylist() == ["ir"] * 5
    assert table.column("candidate_ids").to_pylist() == columns["candidate_ids"].tolist()
    np.testing.assert_array_equal(
        np.stack(table.column("topk_logits").to_numpy(False)), columns["topk_logits"]
    )


@pytest.mark.parametrize("column", ["candidate_logits", "topk_logits", "entropy"])
def test_rows_to_table_rejects_non_finite_values_naming_column_and_query(column):
    columns = random_columns(np.random.default_rng(2), 4, 6, 2)
    values = columns[column].copy()
    values[2] = np.nan if column != "topk_logits" else np.inf
    columns[column] = values
    with pytest.raises(CacheError, match=rf"{column}: non-finite value for query_id 2 "):
        rows_to_table(0, "tr", 0, **columns)


@pytest.mark.parametrize(
    "column, bad, message",
    [
        ("candidate_logits", np.zeros((4, 5), np.float32), r"candidate_logits: expected shape"),
        ("topk_ids", np.zeros((4, 3), np.int64), r"topk_ids: expected shape \(Q, 2\)"),
        ("query_ids", np.arange(3), r"candidate_ids: expected shape"),
        ("candidate_ids", np.zeros((4, 6)), r"candidate_ids: expected integer"),
        ("candidate_logits", np.zeros((4, 6), np.int32), r"candidate_logits: expected floating"),
        ("positive_ids", np.arange(4) + 999, r"candidate_ids: column 0 must be the positive"),
        ("topk_logits", np.array([[0.0, 1.0]] * 4, np.float32), r"sorted descending"),
        ("positive_rank", np.zeros(4, np.int16), r"positive_rank: must lie in 1\.\.6"),
    ],
)
def test_rows_to_table_rejects_bad_input(column, bad, message):
    columns = random_columns(np.random.default_rng(3), 4, 6, 2)
    columns[column] = bad
    with pytest.raises(CacheError, match=message):
        rows_to_table(0, "tr", 0, **columns)


def test_rows_to_table_rejects_unknown_direction():
    columns = random_columns(np.random.default_rng(3), 2, 4, 2)
    with pytest.raises(CacheError, match="direction"):
        rows_to_table(0, ["tr", "xx"], 0, **columns)


# ----------------------------------------------------------------------------- shards


def test_write_shard_is_byte_deterministic_and_atomic(tmp_path):
    table = rows_to_table(0, "tr", 0, **random_columns(np.random.default_rng(4), 300, 16, 4))
    first = write_shard(table, tmp_path / "a" / shard_name(0))
    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=37), table.schema)
    second = write_shard(rechunked, tmp_path / "b" / shard_name(0))
    assert (tmp_path / "a" / shard_name(0)).read_bytes() == (
        tmp_path / "b" / shard_name(0)
    ).read_bytes()
    assert first == second
    assert first.rows == 300 and first.bytes == (tmp_path / "a" / shard_name(0)).stat().st_size
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [shard_name(0)]  # no temp left


def test_write_shard_rejects_bad_name_and_foreign_table(tmp_path):
    table = rows_to_table(0, "tr", 0, **random_columns(np.random.default_rng(5), 3, 4, 2))
    with pytest.raises(CacheError, match="named like shard-00000.parquet"):
        write_shard(table, tmp_path / "part-0.parquet")
    with pytest.raises(CacheError, match="not a dcd cache schema"):
        write_shard(pa.table({"x": [1]}), tmp_path / shard_name(0))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_strictness(tmp_path):
    manifest = make_cache(tmp_path, rounds=1, queries=5)
    assert read_manifest(tmp_path) == manifest
    payload = json.loads((tmp_path / "manifest.json").read_text())
    payload["surprise"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(CacheError, match="surprise"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        make_manifest(fingerprints={"dataset": "d", "teacher": "t"})
    with pytest.raises(CacheError, match="no manifest"):
        read_manifest(tmp_path / "elsewhere")


def test_check_compatible_names_every_differing_field():
    existing = make_manifest()
    check_compatible(existing, make_manifest(shards=[]))  # shards never count
    wanted = make_manifest(
        keep=4,
        fingerprints={"dataset": "d1", "teacher": "t2", "tokenizer": "k1"},
        config={"lr": 0.2, "data": {"split": "train"}},
    )
    with pytest.raises(CacheError) as caught:
        check_compatible(existing, wanted, "runs/cache")
    message = str(caught.value)
    assert "teacher fingerprint differs: cache has 't1', this run has 't2'" in message
    assert "keep differs: cache has 3, this run has 4" in message
    assert "config.lr differs: cache has 0.1, this run has 0.2" in message
    assert "dataset" not in message and "seed" not in message
    assert "use a new --out or delete runs/cache" in message
    check_compatible(
        existing, make_manifest(rounds=5, code_version="def"), ignore=("rounds", "code_version")
    )


# ----------------------------------------------------------------------------- verification


def test_verify_accepts_a_sound_cache(tmp_path):
    make_cache(tmp_path)
    assert verify_cache(tmp_path) == []
    assert verify_cache(tmp_path, deep=True) == []


def test_verify_names_each_damaged_shard(tmp_path):
    make_cache(tmp_path)
    flipped = tmp_path / shard_name(1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / shard_name(2)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (tmp_path / shard_name(3)).unlink()
    (tmp_path / shard_name(9)).write_bytes(b"not listed")
    (tmp_path / f".{shard_name(4)}.123.tmp").write_bytes(b"half")

    problems = verify_cache(tmp_path)
    assert len(problems) == 5, problems
    by_name = {line.split(":")[0]: line for line in problems}
    assert "sha256 mismatch" in by_name[shard_name(1)]
    assert "unreadable Parquet" in by_name[shard_name(2)]
    assert "manifest says" in by_name[shard_name(2)]
    assert "missing" in by_name[shard_name(3)]
    assert "not listed" in by_name[shard_name(9)]
    assert "stray temporary" in by_name[f".{shard_name(4)}.123.tmp"]
    assert shard_name(0) not in by_name


def test_verify_reports_row_count_and_schema_mismatch(tmp_path):
    manifest = make_cache(tmp_path, rounds=1)
    manifest.shards[0].rows += 1
    other = rows_to_table(0, "tr", 0, **random_columns(np.random.default_rng(6), 60, 5, 3))
    manifest.shards[1] = write_shard(other, tmp_path / shard_name(1))  # G = 5, manifest says 8
    write_manifest(tmp_path, manifest)
    problems = verify_cache(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith(shard_name(0)) and "61" in problems[0]
    assert problems[1].startswith(shard_name(1)) and "schema mismatch" in problems[1]


# ----------------------------------------------------------------------------- streaming


def test_iter_batches_filters_selects_and_rebatches(tmp_path):
    make_cache(tmp_path, rounds=3, queries=50, row_group_rows=16)
    batches = list(
        iter_batches(
            tmp_path, ["query_id", "entropy"], batch_rows=32, rounds=[0, 2], direction="ir"
        )
    )
    assert all(batch.schema.names == ["query_id", "entropy"] for batch in batches)
    assert [batch.num_rows for batch in batches] == [32, 32, 32, 4]
    # Shard index = 2 * round + (direction == "ir"); ids start at index * 10**6.
    expected = [index * 10**6 + i for index in (1, 5) for i in range(50)]
    assert all_query_ids(batches) == expected
    assert sum(b.num_rows for b in iter_batches(tmp_path, batch_rows=7)) == 3 * 2 * 50


def test_iter_batches_rejects_unknown_column_and_direction(tmp_path):
    make_cache(tmp_path, rounds=1, queries=5)
    with pytest.raises(CacheError, match="unknown column"):
        next(iter_batches(tmp_path, ["query_id", "nope"]))
    with pytest.raises(ValueError, match="direction"):
        next(iter_batches(tmp_path, direction="both"))
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(CacheError, match="shard-00001.parquet: unreadable"):
        iter_batches(tmp_path)


def test_rebatch_holds_under_two_batches_of_rows():
    sizes = [5, 40, 1, 1, 100, 3, 17]
    pulled = yielded = 0
    most_held = 0

    def source():
        nonlocal pulled
        for size in sizes:
            pulled += size
            yield pa.record_batch({"x": np.arange(size)})

    out = []
    for batch in _rebatch(source(), 16):
        yielded += batch.num_rows
        most_held = max(most_held, pulled - yielded)
        out.append(batch.num_rows)
    assert out == [16] * 10 + [7]
    assert most_held < 100 + 16  # one source batch plus a partial output batch


def test_iter_batches_memory_does_not_grow_with_cache_size(tmp_path):
    def peak_bytes(cache_dir: Path, rounds: int) -> tuple[int, int]:
        make_cache(
            cache_dir, rounds=rounds, queries=2000, group_size=64, keep=8, row_group_rows=500
        )
        base = pa.total_allocated_bytes()
        peak, rows = 0, 0
        for batch in iter_batches(cache_dir, batch_rows=256):
            rows += batch.num_rows
            peak = max(peak, pa.total_allocated_bytes() - base)
        return peak, rows

    small_peak, small_rows = peak_bytes(tmp_path / "small", rounds=1)
    big_peak, big_rows = peak_bytes(tmp_path / "big", rounds=4)
    assert big_rows == 4 * small_rows == 16000
    decoded_bytes_per_row = 64 * 12 + 8 * 12 + 24
    assert big_peak < 0.2 * big_rows * decoded_bytes_per_row
    assert big_peak < 2 * small_peak + (1 << 20)


def test_shuffle_is_seeded_complete_and_filtered(tmp_path):
    make_cache(tmp_path, rounds=2, queries=200, row_group_rows=50)
    ordered = all_query_ids(iter_batches(tmp_path, ["query_id"]))

    def shuffled(seed: int, **filters) -> list[int]:
        return all_query_ids(
            shuffled_batches(
                tmp_path, seed, buffer_rows=64, batch_rows=16, columns=["query_id"], **filters
            )
        )

    first = shuffled(1)
    assert first == shuffled(1)
    assert first != shuffled(2)
    assert first != ordered and sorted(first) == sorted(ordered)
    assert sorted(shuffled(3, rounds=[1], direction="tr")) == list(
        range(2 * 10**6, 2 * 10**6 + 200)
    )
    rows = list(
        shuffled_rows(
            tmp_path, 1, buffer_rows=64, batch_rows=16, columns=["query_id", "positive_rank"]
        )
    )
    assert [row["query_id"] for row in rows] == first
    assert set(rows[0]) == {"query_id", "positive_rank"}


def test_shuffle_buffer_bounds_rows_held_and_draws_each_row_once():
    rng = np.random.default_rng(0)
    buffer = ShuffleBuffer(capacity=100, rng=rng)
    drawn, most_held = [], 0
    for start in range(0, 2000, 30):
        buffer.add(pa.record_batch({"x": np.arange(start, min(start + 30, 2000))}))
        while buffer.rows_waiting >= 100:
            drawn += buffer.draw(10).column("x").to_pylist()
            most_held = max(most_held, buffer.rows_held)
    while buffer.rows_waiting:
        drawn += buffer.draw(10).column("x").to_pylist()
    assert sorted(drawn) == list(range(2000))
    assert most_held <= 2 * 100 + 30
    # Rows leave the buffer well mixed: the first 100 drawn are not the first 100 added.
    assert sum(x < 100 for x in drawn[:100]) < 80
