"""DuckDB inspection: views, preset reports on a hand-made cache, read-only SQL, formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from pipeline.inspection import (
    ENTROPY_BINS,
    PRESETS,
    format_result,
    open_cache,
    run_sql,
    teacher_ranks,
)
from pipeline.knowledge import derived_columns
from pipeline.shards import (
    CacheError,
    CacheManifest,
    rows_to_table,
    shard_name,
    write_manifest,
    write_shard,
)

torch.set_num_threads(1)


# G = 4 candidates, K = 2 kept. Column 0 is the positive. Expected values below are worked
# out by hand from these logits.
HAND_ROWS = [  # (direction, query_id, candidate_ids, candidate_logits)
    ("tr", 1, [100, 101, 102, 103], [3, 1, 2, 0]),  # rank 1, margin 1
    ("tr", 2, [101, 100, 103, 102], [1, 2, 2, 0]),  # rank 3: genetic error, outside top K
    ("tr", 3, [102, 103, 100, 101], [2, 2, 0, 1]),  # rank 2 (tie counts against it)
    ("tr", 6, [103, 102, 101, 100], [5, 4, 0, 0]),  # rank 1
    ("tr", 7, [100, 103, 102, 101], [6, 0, 1, 2]),  # rank 1, margin 4
    ("ir", 4, [200, 201, 202, 203], [0, 5, 1, 2]),  # rank 4, margin -5
    ("ir", 5, [201, 200, 203, 202], [4, 1, 1, 1]),  # rank 1, three tied negatives
]
CAPTIONS = {100: "a red cube", 102: "two blue balls"}
IMAGE_NAMES = {200: "img200.png"}


def write_cache(
    cache_dir: Path, directions, query_ids, candidate_ids, logits, keep: int, shard_rows: int
) -> None:
    candidate_ids = np.asarray(candidate_ids)
    logits = np.asarray(logits, np.float32)
    derived = derived_columns(candidate_ids, logits, keep)
    shards = []
    for start in range(0, len(query_ids), shard_rows):
        part = slice(start, start + shard_rows)
        table = rows_to_table(
            np.where(np.asarray(directions[part]) == "tr", 0, 1),
            directions[part],
            0,
            np.asarray(query_ids[part]),
            candidate_ids[part, 0],
            candidate_ids[part],
            logits[part],
            **{name: values[part] for name, values in derived.items()},
        )
        shards.append(write_shard(table, cache_dir / shard_name(len(shards))))
    write_manifest(
        cache_dir,
        CacheManifest(
            fingerprints={"dataset": "d", "teacher": "t", "tokenizer": "k"},
            group_size=candidate_ids.shape[1],
            keep=keep,
            rounds=2,
            seed=0,
            code_version="test",
            shards=shards,
        ),
    )


@pytest.fixture
def hand_cache(tmp_path) -> Path:
    directions, query_ids, ids, logits = zip(*HAND_ROWS, strict=True)
    write_cache(tmp_path, list(directions), list(query_ids), ids, logits, keep=2, shard_rows=4)
    return tmp_path


@pytest.fixture
def con(hand_cache) -> duckdb.DuckDBPyConnection:
    return open_cache(hand_cache, captions=CAPTIONS, image_names=IMAGE_NAMES)


def by_direction(table) -> dict[str, dict]:
    return {row["direction"]: row for row in table.to_pylist()}


# ----------------------------------------------------------------------------- ranks and views


def test_teacher_ranks_known_values_and_brute_force_oracle():
    logits = np.array([[1, 2, 2, 0], [4, 1, 1, 1], [3, 1, 2, 0]], np.float32)
    assert teacher_ranks(logits).tolist() == [[3, 2, 2, 4], [1, 4, 4, 4], [1, 3, 2, 4]]
    rng = np.random.default_rng(0)
    rounded = np.round(rng.standard_normal((500, 16)), 1).astype(np.float32)  # many ties
    brute = (rounded[:, None, :] >= rounded[:, :, None]).sum(axis=2)
    np.testing.assert_array_equal(teacher_ranks(rounded), brute)


def test_candidates_view_has_one_row_per_candidate_with_ranks(con):
    assert con.sql("SELECT count(*) FROM candidates").fetchall() == [(len(HAND_ROWS) * 4,)]
    rows = con.sql("""SELECT query_id, list(teacher_rank ORDER BY draw_pos),
                             list(in_topk ORDER BY draw_pos), list(candidate_id ORDER BY draw_pos)
                      FROM candidates WHERE query_id IN (2, 5, 6)
                      GROUP BY query_id ORDER BY query_id""").fetchall()
    assert rows == [
        (2, [3, 2, 2, 4], [True, True, False, False], [101, 100, 103, 102]),
        (5, [1, 4, 4, 4], [True, True, False, False], [201, 200, 203, 202]),
        (6, [1, 2, 4, 4], [True, True, False, False], [103, 102, 101, 100]),
    ]
    positives = con.sql("""SELECT count(*) FILTER (is_positive), count(*) FILTER (
                               is_positive AND (draw_pos != 0 OR candidate_id != positive_id))
                           FROM candidates""").fetchall()
    assert positives == [(len(HAND_ROWS), 0)]


def test_queries_view_columns(con):
    rows = con.sql("SELECT query_id, positive_rank, g, k, margin FROM queries ORDER BY query_id")
    assert rows.fetchall() == [
        (1, 1, 4, 2, 1.0),
        (2, 3, 4, 2, -1.0),
        (3, 2, 4, 2, 0.0),
        (4, 4, 4, 2, -5.0),
        (5, 1, 4, 2, 3.0),
        (6, 1, 4, 2, 1.0),
        (7, 1, 4, 2, 4.0),
    ]


# ----------------------------------------------------------------------------- presets


def test_genetic_errors_and_outside_topk(con):
    errors = by_direction(PRESETS["genetic_errors"](con))
    assert (errors["tr"]["queries"], errors["tr"]["genetic_errors"]) == (5, 2)
    assert errors["tr"]["share"] == pytest.approx(0.4)
    assert (errors["ir"]["queries"], errors["ir"]["genetic_errors"]) == (2, 1)
    outside = by_direction(PRESETS["positive_outside_topk"](con))
    assert (outside["tr"]["outside_topk"], outside["tr"]["share"]) == (1, pytest.approx(0.2))
    assert (outside["ir"]["outside_topk"], outside["ir"]["share"]) == (1, pytest.approx(0.5))


def test_hard_negatives_counts_and_labels(con):
    rows = [
        (r["direction"], r["candidate_id"], r["times_hard"], r["label"])
        for r in PRESETS["hard_negatives"](con).to_pylist()
    ]
    assert rows == [
        ("ir", 200, 1, "img200.png"),
        ("ir", 201, 1, None),
        ("tr", 102, 2, "two blue balls"),
        ("tr", 100, 1, "a red cube"),
        ("tr", 101, 1, None),
        ("tr", 103, 1, None),
    ]


def test_hard_negatives_without_names_has_empty_labels(hand_cache):
    table = PRESETS["hard_negatives"](open_cache(hand_cache))
    assert table.num_rows == 6 and set(table.column("label").to_pylist()) == {None}


def test_margins_summary(con):
    margins = by_direction(PRESETS["margins"](con))
    assert margins["tr"]["mean"] == pytest.approx(1.0)
    assert (margins["tr"]["min"], margins["tr"]["q50"], margins["tr"]["max"]) == (-1, 1, 4)
    assert margins["tr"]["share_negative"] == pytest.approx(0.2)
    assert margins["ir"]["mean"] == pytest.approx(-1.0)
    assert margins["ir"]["share_negative"] == pytest.approx(0.5)


def test_entropy_histogram_bins(con):
    table = PRESETS["entropy_histogram"](con).to_pylist()
    assert len(table) == 2 * ENTROPY_BINS
    tr = [row["queries"] for row in table if row["direction"] == "tr"]
    assert sum(tr) == 5
    # Queries 2 and 3 keep scores (2, 2): entropy ln 2, the maximum, lands in the last bin;
    # 1 and 6 keep scores 1 apart: entropy 0.5822, bin floor(0.5822 / ln 2 * 20) = 16;
    # 7 keeps (6, 2): entropy 0.0898, bin 2.
    assert (tr[ENTROPY_BINS - 1], tr[16], tr[2]) == (2, 2, 1)
    top = [row["high"] for row in table if row["direction"] == "ir"][-1]
    assert top == pytest.approx(math.log(2))


def test_views_and_presets_agree_with_numpy_on_a_random_cache(tmp_path):
    rng = np.random.default_rng(5)
    queries, group_size, keep = 300, 16, 4
    ids = rng.integers(0, 40, (queries, 1)) * 1000 + np.arange(group_size)  # reused ids
    logits = np.round(rng.standard_normal((queries, group_size)), 1)  # ties on purpose
    directions = list(rng.choice(["tr", "ir"], queries))
    write_cache(tmp_path, directions, list(range(queries)), ids, logits, keep, shard_rows=70)
    con = open_cache(tmp_path)

    ranks = con.sql("""SELECT list(teacher_rank ORDER BY draw_pos) FROM candidates
                       GROUP BY query_id ORDER BY query_id""").fetchall()
    brute = (logits[:, None, :] >= logits[:, :, None]).sum(axis=2)
    np.testing.assert_array_equal(np.array([r[0] for r in ranks]), brute)

    from_view = (
        con.sql("""SELECT direction, candidate_id, count(*) AS times_hard
                           FROM candidates WHERE in_topk AND NOT is_positive
                           GROUP BY ALL ORDER BY direction, times_hard DESC, candidate_id
                           """)
        .to_arrow_table()
        .to_pylist()
    )
    preset = PRESETS["hard_negatives"](con).drop_columns(["label"]).to_pylist()
    for direction in ("ir", "tr"):
        expected = [row for row in from_view if row["direction"] == direction][:20]
        assert [row for row in preset if row["direction"] == direction] == expected


def test_open_cache_needs_a_manifest(tmp_path):
    with pytest.raises(CacheError, match="no manifest"):
        open_cache(tmp_path)


# ----------------------------------------------------------------------------- read-only SQL


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) AS n FROM queries",
        "WITH a AS (SELECT * FROM queries) SELECT count(*) AS n FROM a",
        "FROM queries SELECT count(*) AS n",
    ],
)
def test_run_sql_reads(con, sql):
    assert run_sql(con, sql).to_pylist() == [{"n": len(HAND_ROWS)}]


def test_run_sql_describes_and_lists(con):
    described = run_sql(con, "DESCRIBE candidates").column("column_name").to_pylist()
    assert {"teacher_rank", "draw_pos", "in_topk"} <= set(described)
    tables = set(run_sql(con, "SHOW TABLES").column("name").to_pylist())
    assert {"queries", "candidates", "captions", "images"} <= tables
    assert run_sql(con, "PRAGMA show_tables").num_rows == len(tables)
    assert run_sql(con, "EXPLAIN SELECT * FROM queries").num_rows >= 1


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO captions VALUES (1, 'x')",
        "UPDATE captions SET text = 'x'",
        "DELETE FROM captions",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW queries",
        "COPY queries TO 'out.csv'",
        "ATTACH 'other.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 1",
        "PRAGMA enable_profiling",
        "CALL pragma_show_tables()",
        "SELECT 1; DROP VIEW queries",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    ],
)
def test_run_sql_rejects_anything_that_writes(con, sql):
    with pytest.raises(CacheError, match="allowed"):
        run_sql(con, sql)
    assert con.sql("SELECT count(*) FROM queries").fetchall() == [(len(HAND_ROWS),)]
    assert con.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 't'").fetchall() == [
        (0,)
    ]


def test_run_sql_reports_bad_sql_as_cache_error(con):
    with pytest.raises(CacheError, match="query failed.*no_such_column"):
        run_sql(con, "SELECT no_such_column FROM queries")
    with pytest.raises(CacheError, match="query failed.*disabled"):
        run_sql(con, "SELECT * FROM read_csv('/etc/passwd')")


def test_connection_cannot_touch_files_outside_the_cache(con, tmp_path):
    with pytest.raises(duckdb.Error):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path.parent / 'escape.csv'}'")
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")


# ----------------------------------------------------------------------------- formatting


def test_format_result_in_three_formats(con):
    table = run_sql(
        con,
        "SELECT query_id, margin, positive_id FROM queries "
        "WHERE query_id IN (1, 2) ORDER BY query_id",
    )
    assert format_result(table, "csv") == "query_id,margin,positive_id\n1,1.0,100\n2,-1.0,101\n"
    assert json.loads(format_result(table, "json")) == [
        {"query_id": 1, "margin": 1.0, "positive_id": 100},
        {"query_id": 2, "margin": -1.0, "positive_id": 101},
    ]
    text = format_result(table, "table").splitlines()
    assert text[0].split() == ["query_id", "margin", "positive_id"]
    assert text[2].split() == ["1", "1", "100"] and text[-1] == "(2 rows)"
    with pytest.raises(ValueError, match="format"):
        format_result(table, "xml")
