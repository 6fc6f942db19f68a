"""Read-only DuckDB views and preset reports over a knowledge cache.

    python -c "from pipeline.inspection import *; con = open_cache('runs/cache');
    print(format_result(PRESETS['genetic_errors'](con)))"

Views (see docs/_inspect_section.md for example SQL):
- `cache_rows`: the shard rows as stored (list columns included);
- `queries`: one row per (round, direction, query), every scalar column plus `g`, `k`,
  `positive_logit` and `margin` (positive logit minus the best negative logit);
- `candidates`: one row per (query, candidate) with its draw position, teacher logit and
  1-based teacher rank among the G (ties counted pessimistically, like `positive_rank`);
- tables `captions(caption_id, text)` and `images(image_id, name)`, filled from what is
  given to `open_cache` (empty otherwise).
In "tr" queries the candidates are captions, in "ir" queries images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.shards import CacheError, CacheManifest, read_manifest

log = logging.getLogger(__name__)

ENTROPY_BINS = 20
HARD_NEGATIVES_TOP = 20
_RANKS_FUNCTION = "dcd_teacher_ranks"
# EXPLAIN is checked through to the statement it explains: EXPLAIN ANALYZE executes it.
_READ_ONLY_TYPES = {
    duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA,
}  # fmt: skip
_READ_ONLY_PRAGMAS = {
    "show_tables", "show_tables_expanded", "table_info", "show", "version", "database_size",
}  # fmt: skip


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def open_cache(
    cache_dir: Path,
    captions: dict[int, str] | None = None,
    image_names: dict[int, str] | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views above over the manifest's shards.

    File access is then limited to the cache directory and the configuration is locked, so
    even a statement that slips past `run_sql` cannot write files or load extensions.
    """
    cache_dir = Path(cache_dir).resolve()
    manifest = read_manifest(cache_dir)
    if not manifest.shards:
        raise CacheError(f"{cache_dir}: the manifest lists no shards yet; nothing to inspect")
    con = duckdb.connect(":memory:")
    _create_views(con, [cache_dir / shard.name for shard in manifest.shards], manifest)
    # Always present (empty when not given), so reports and saved queries can join them.
    _register_names(con, "captions", "caption_id", "text", captions or {})
    _register_names(con, "images", "image_id", "name", image_names or {})
    con.execute(f"SET allowed_directories = [{_sql_text(str(cache_dir) + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    rows = sum(shard.rows for shard in manifest.shards)
    log.info("opened %s: %d shards, %d query rows", cache_dir, len(manifest.shards), rows)
    return con


def _create_views(
    con: duckdb.DuckDBPyConnection, shard_paths: list[Path], manifest: CacheManifest
) -> None:
    # Ranks come from numpy: on the 10M-candidate bench DuckDB's own list functions took 7 s
    # (list_grade_up) to 14 s (window rank, lambdas), this UDF about 1 s.
    ranks_type = duckdb.list_type("SMALLINT")
    con.create_function(
        _RANKS_FUNCTION, _arrow_teacher_ranks, [duckdb.list_type("FLOAT")], ranks_type,
        type="arrow", side_effects=False,
    )  # fmt: skip
    paths = ", ".join(_sql_text(str(path)) for path in shard_paths)
    con.execute(f"""
        CREATE VIEW cache_rows AS
        SELECT * REPLACE (direction::VARCHAR AS direction) FROM read_parquet([{paths}])""")
    con.execute(_queries_view(manifest.group_size, manifest.keep))
    con.execute(_candidates_view(manifest.group_size))


def _queries_view(group_size: int, keep: int) -> str:
    return f"""
        CREATE VIEW queries AS
        SELECT round, direction, group_id, query_id, positive_id,
               positive_rank, entropy, positive_prob,
               {group_size} AS g, {keep} AS k,
               candidate_logits[1] AS positive_logit,
               candidate_logits[1] - list_max(candidate_logits[2:]) AS margin
        FROM cache_rows"""


def _candidates_view(group_size: int) -> str:
    return f"""
        CREATE VIEW candidates AS
        SELECT * EXCLUDE (topk_ids),
               draw_pos = 0 AS is_positive,
               list_contains(topk_ids, candidate_id) AS in_topk
        FROM (SELECT round, direction, group_id, query_id, positive_id, topk_ids,
                     unnest(candidate_ids) AS candidate_id,
                     unnest(range({group_size})) AS draw_pos,
                     unnest(candidate_logits) AS teacher_logit,
                     unnest({_RANKS_FUNCTION}(candidate_logits)) AS teacher_rank
              FROM cache_rows)"""


def teacher_ranks(logits: np.ndarray) -> np.ndarray:
    """(Q, G) logits -> (Q, G) int16 1-based descending ranks, a tie ranked at its group's end
    (the count of logits >= it), the rule `positive_rank` uses."""
    num_queries, group_size = logits.shape
    order = np.argsort(logits, axis=1)
    ascending = np.take_along_axis(logits, order, axis=1)
    below = np.broadcast_to(np.arange(group_size), logits.shape)  # logits < it, if no ties
    tied = np.flatnonzero((ascending[:, 1:] == ascending[:, :-1]).any(axis=1))
    if len(tied):
        # Within a run of equal values every member counts only what lies below the run.
        run_start = np.ones((len(tied), group_size), bool)
        run_start[:, 1:] = ascending[tied, 1:] != ascending[tied, :-1]
        below = below.copy()
        below[tied] = np.maximum.accumulate(np.where(run_start, np.arange(group_size), 0), axis=1)
    ranks = np.empty(logits.shape, np.int16)
    ranks[np.arange(num_queries)[:, None], order] = group_size - below
    return ranks


def _arrow_teacher_ranks(logits: pa.Array | pa.ChunkedArray) -> pa.Array:
    """DuckDB vectorised UDF: list<float> of one query's G logits -> list<smallint> ranks."""
    if isinstance(logits, pa.ChunkedArray):
        logits = logits.combine_chunks()
    values = logits.flatten().to_numpy().reshape(len(logits), -1)
    ranks = teacher_ranks(values)
    offsets = np.arange(0, ranks.size + 1, max(ranks.shape[1], 1), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ranks.ravel()))


def _register_names(
    con: duckdb.DuckDBPyConnection,
    table: str,
    id_column: str,
    text_column: str,
    names: dict[int, str],
) -> None:
    data = pa.table(
        {
            id_column: pa.array(list(names), pa.int64()),
            text_column: pa.array(list(names.values()), pa.string()),
        }
    )
    con.register("_names", data)
    con.execute(f"CREATE TABLE {table} AS SELECT * FROM _names")
    con.unregister("_names")


# ----------------------------------------------------------------------------- presets


def _table(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    return con.sql(sql).to_arrow_table()


def genetic_errors(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per direction: queries, and how many / what share the teacher ranks a negative first."""
    return _table(
        con,
        """
        SELECT direction, count(*) AS queries,
               count(*) FILTER (positive_rank > 1) AS genetic_errors,
               avg((positive_rank > 1)::DOUBLE) AS share
        FROM queries GROUP BY direction ORDER BY direction""",
    )


def positive_outside_topk(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per direction: queries whose positive the teacher ranks below K (KA had to pull it in)."""
    return _table(
        con,
        """
        SELECT direction, count(*) AS queries,
               count(*) FILTER (positive_rank > k) AS outside_topk,
               avg((positive_rank > k)::DOUBLE) AS share
        FROM queries GROUP BY direction ORDER BY direction""",
    )


def entropy_histogram(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per direction: counts of the teacher entropy over the kept K in ENTROPY_BINS equal bins
    of [0, ln K] (its full range), empty bins included."""
    # greatest(..., 1e-9): with K = 1 every entropy is 0 and lands in bin 0.
    return _table(
        con,
        f"""
        WITH scaled AS (
            SELECT direction, entropy / greatest(ln(k), 1e-9) * {ENTROPY_BINS} AS position,
                   ln(k) AS top
            FROM queries),
        binned AS (
            SELECT direction, top,
                   greatest(least(floor(position), {ENTROPY_BINS} - 1), 0)::INTEGER AS bin
            FROM scaled),
        grid AS (
            SELECT direction, any_value(top) AS top, unnest(range({ENTROPY_BINS})) AS bin
            FROM binned GROUP BY direction)
        SELECT grid.direction, grid.bin, grid.bin * grid.top / {ENTROPY_BINS} AS low,
               (grid.bin + 1) * grid.top / {ENTROPY_BINS} AS high, count(binned.bin) AS queries
        FROM grid LEFT JOIN binned USING (direction, bin)
        GROUP BY ALL ORDER BY grid.direction, grid.bin""",
    )


def hard_negatives(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per direction: the HARD_NEGATIVES_TOP candidates most often kept by KA as negatives (the
    K-1 best-scored negatives of a query), with counts and caption text / image name if known."""
    return _table(
        con,
        f"""
        WITH mined AS (
            SELECT direction, candidate_id, count(*) AS times_hard
            FROM (SELECT direction, unnest(topk_ids[2:]) AS candidate_id FROM cache_rows)
            GROUP BY direction, candidate_id
            QUALIFY row_number() OVER (PARTITION BY direction
                                       ORDER BY times_hard DESC, candidate_id)
                    <= {HARD_NEGATIVES_TOP})
        SELECT direction, candidate_id, times_hard,
               CASE direction WHEN 'tr' THEN captions.text ELSE images.name END AS label
        FROM mined
        LEFT JOIN captions ON direction = 'tr' AND captions.caption_id = candidate_id
        LEFT JOIN images ON direction = 'ir' AND images.image_id = candidate_id
        ORDER BY direction, times_hard DESC, candidate_id""",
    )


def margins(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per direction: positive logit minus best negative logit; mean, quantiles, share < 0."""
    quantiles = ", ".join(
        f"quantile_cont(margin, {q}) AS q{round(q * 100):02d}"
        for q in (0.05, 0.25, 0.5, 0.75, 0.95)
    )
    return _table(
        con,
        f"""
        SELECT direction, count(*) AS queries, avg(margin) AS mean, min(margin) AS min,
               {quantiles}, max(margin) AS max, avg((margin < 0)::DOUBLE) AS share_negative
        FROM queries GROUP BY direction ORDER BY direction""",
    )


PRESETS: dict[str, Callable[[duckdb.DuckDBPyConnection], pa.Table]] = {
    "genetic_errors": genetic_errors,
    "entropy_histogram": entropy_histogram,
    "positive_outside_topk": positive_outside_topk,
    "hard_negatives": hard_negatives,
    "margins": margins,
}


# ----------------------------------------------------------------------------- ad-hoc SQL


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run read-only SQL (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, and a few
    listing PRAGMAs); anything that writes or changes settings raises CacheError unrun."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise CacheError(f"cannot parse SQL: {err}") from None
    if not statements:
        raise CacheError("no SQL statement given")
    for statement in statements:
        _check_read_only(con, statement.query, statement.type)
    try:
        for statement in statements[:-1]:
            con.execute(statement.query)
        result = con.sql(statements[-1].query)
        return pa.table({}) if result is None else result.to_arrow_table()
    except duckdb.Error as err:
        raise CacheError(f"query failed: {err}") from None


def _check_read_only(
    con: duckdb.DuckDBPyConnection, query: str, kind: duckdb.StatementType
) -> None:
    text = query.strip().rstrip(";").strip()
    if kind not in _READ_ONLY_TYPES:
        raise CacheError(
            f"only read-only SQL is allowed (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN);"
            f" refusing {kind.name}: {text[:80]}"
        )
    if kind == duckdb.StatementType.EXPLAIN:
        inner = re.sub(
            r"^explain\s+(analyze\s+)?(\(.*?\)\s*)?", "", text, flags=re.IGNORECASE | re.DOTALL
        )
        for statement in con.extract_statements(inner):
            _check_read_only(con, statement.query, statement.type)
    if kind == duckdb.StatementType.PRAGMA:
        pragma = re.match(r"pragma\s+(\w+)", text, flags=re.IGNORECASE)
        if pragma is None or pragma.group(1).lower() not in _READ_ONLY_PRAGMAS:
            raise CacheError(
                f"only listing PRAGMAs {sorted(_READ_ONLY_PRAGMAS)} are allowed; "
                f"refusing: {text[:80]}"
            )


def format_result(table: pa.Table, fmt: str = "table") -> str:
    """Render a result as an aligned text table, CSV or JSON (a list of row objects)."""
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_csv_cell(row[name]) for name in table.column_names] for row in rows)
        return out.getvalue()
    if fmt == "table":
        return _text_table(table.column_names, rows)
    raise ValueError(f"format must be 'table', 'csv' or 'json', got {fmt!r}")


def _csv_cell(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value


def _cell(value: Any, width: int = 48) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
    else:
        text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _text_table(names: list[str], rows: list[dict[str, Any]]) -> str:
    cells = [[_cell(row[name]) for name in names] for row in rows]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(names)]
    lines = [
        "  ".join(name.ljust(w) for name, w in zip(names, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in cells
    ]
    return "\n".join(lines) + f"\n({len(rows)} rows)"
