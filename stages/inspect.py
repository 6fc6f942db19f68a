"""Inspection: read-only DuckDB over a knowledge cache, preset reports or any SQL.

dcd inspect runs/cache --preset genetic_errors --format csv
dcd inspect runs/cache --sql "SELECT direction, avg(entropy) FROM queries GROUP BY 1"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.data import DataConfig, dataset_spec
from pipeline.inspection import PRESETS, format_result, open_cache, run_sql
from pipeline.shards import CacheError, read_manifest

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json")


def _names(cache_dir: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Caption texts and image file names of the dataset the cache was built from."""
    data = DataConfig(**read_manifest(cache_dir).config.get("data", {}))
    dataset = dataset_spec(data).load(data.restval_as_train)
    names = {entry.image_id: entry.relpath for entry in dataset.images}
    return dataset.captions, names


def run(
    cache_dir: Path,
    presets: list[str] | None = None,
    sql: str | None = None,
    fmt: str = "table",
    texts: bool = True,
) -> list[tuple[str, str]]:
    """(title, formatted result) for each requested report, or for the one SQL query; with
    `fmt` json a single untitled JSON document (an object keyed by preset if several)."""
    if fmt not in FORMATS:
        raise CacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    unknown = [name for name in presets or [] if name not in PRESETS]
    if unknown:
        raise CacheError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    captions, images = _names(cache_dir) if texts else ({}, {})
    con = open_cache(cache_dir, captions, images)
    if sql:
        return [("", format_result(run_sql(con, sql), fmt))]
    tables = {name: PRESETS[name](con) for name in presets or PRESETS}
    if fmt == "json" and len(tables) > 1:
        # one JSON document (an object keyed by preset), so the output parses as a whole
        reports = {name: table.to_pylist() for name, table in tables.items()}
        return [("", json.dumps(reports, indent=2, default=str))]
    if fmt == "json":
        return [("", format_result(next(iter(tables.values())), fmt))]
    return [(name, format_result(table, fmt)) for name, table in tables.items()]
