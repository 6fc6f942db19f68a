"""Streaming the knowledge cache: row groups in manifest or seeded random order, filtered by
round and direction, regrouped into fixed-size batches; memory stays bounded whatever the size.

    for batch in shuffled_batches("runs/cache", seed=0, batch_rows=32, rounds=[0]):
        ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.shards import DIRECTIONS, CacheError, read_manifest


def iter_batches(
    cache_dir: Path,
    columns: list[str] | None = None,
    batch_rows: int = 1024,
    rounds: list[int] | None = None,
    direction: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream the cache in manifest order as batches of exactly `batch_rows` rows (the last one
    may be shorter), keeping only `rounds` and `direction` when given.

    Reads one row group at a time, so memory stays near one row group plus one batch whatever
    the cache size; row groups whose statistics exclude the filter are skipped unread.
    """
    units = _row_groups(Path(cache_dir), rounds, direction)
    return _rebatch(_read_units(units, columns, batch_rows, rounds, direction), batch_rows)


def shuffled_batches(
    cache_dir: Path,
    seed: int,
    buffer_rows: int = 65536,
    batch_rows: int = 1024,
    columns: list[str] | None = None,
    rounds: list[int] | None = None,
    direction: str | None = None,
) -> Iterator[pa.RecordBatch]:
    """Like `iter_batches` but in a seeded random order: row groups in a shuffled order feed a
    shuffle buffer of `buffer_rows` rows from which each batch is drawn uniformly.

    The same seed gives the same order; memory is bounded by about 2 x `buffer_rows` rows.
    """
    if buffer_rows < batch_rows:
        raise ValueError(f"buffer_rows ({buffer_rows}) must be at least batch_rows ({batch_rows})")
    rng = np.random.default_rng(seed)
    units = _row_groups(Path(cache_dir), rounds, direction)
    units = [units[i] for i in rng.permutation(len(units))]
    buffer = ShuffleBuffer(buffer_rows, rng)
    for batch in _read_units(units, columns, batch_rows, rounds, direction):
        buffer.add(batch)
        while buffer.rows_waiting >= buffer_rows:
            yield buffer.draw(batch_rows)
    while buffer.rows_waiting:
        yield buffer.draw(batch_rows)


def shuffled_rows(
    cache_dir: Path, seed: int, buffer_rows: int = 65536, **filters: Any
) -> Iterator[dict[str, Any]]:
    """`shuffled_batches` one row at a time, as dicts (convenient, slower than batches)."""
    for batch in shuffled_batches(cache_dir, seed, buffer_rows, **filters):
        yield from batch.to_pylist()


class ShuffleBuffer:
    """Rows waiting to be handed out in random order.

    Drawn rows stay in their source batch until more than `capacity` of them are dead, then the
    live ones are compacted into one batch: memory holds at most ~2 x capacity + one batch rows,
    and each row is copied O(1) times on average.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self._rng = rng
        self._chunks: list[pa.RecordBatch] = []
        self._starts = np.zeros(1, np.int64)  # row offset of each chunk, plus the end
        self._live = np.zeros(0, np.int64)  # offsets of rows not yet drawn

    @property
    def rows_held(self) -> int:
        return int(self._starts[-1])

    @property
    def rows_waiting(self) -> int:
        return len(self._live)

    def add(self, batch: pa.RecordBatch) -> None:
        start = self.rows_held
        self._chunks.append(batch)
        self._starts = np.append(self._starts, start + batch.num_rows)
        self._live = np.concatenate([self._live, np.arange(start, start + batch.num_rows)])

    def draw(self, rows: int) -> pa.RecordBatch:
        picks = self._rng.choice(len(self._live), size=min(rows, len(self._live)), replace=False)
        batch = self._gather(self._live[picks])
        self._live = np.delete(self._live, picks)
        if self.rows_held - self.rows_waiting > self.capacity:
            self._compact()
        return batch

    def _gather(self, offsets: np.ndarray) -> pa.RecordBatch:
        chunk_of = np.searchsorted(self._starts, offsets, side="right") - 1
        pieces = [
            self._chunks[c].take(offsets[chunk_of == c] - self._starts[c])
            for c in np.unique(chunk_of)
        ]
        # Rows come grouped by chunk; a second permutation keeps the batch order random too.
        merged = pa.concat_batches(pieces) if len(pieces) > 1 else pieces[0]
        return merged.take(self._rng.permutation(merged.num_rows))

    def _compact(self) -> None:
        if not self.rows_waiting:
            self._chunks, self._starts = [], np.zeros(1, np.int64)
            return
        live = self._gather(np.sort(self._live))
        self._chunks, self._starts = [live], np.array([0, live.num_rows], np.int64)
        self._live = np.arange(live.num_rows)


def _row_groups(
    cache_dir: Path, rounds: list[int] | None, direction: str | None
) -> list[tuple[Path, int]]:
    """(shard path, row group index) of every row group that may hold matching rows."""
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} or None, got {direction!r}")
    units = []
    for entry in read_manifest(cache_dir).shards:
        try:
            metadata = pq.ParquetFile(cache_dir / entry.name).metadata
        except (OSError, pa.ArrowException) as err:
            path = cache_dir / entry.name
            raise CacheError(f"{path}: unreadable ({err}); run verify_cache") from None
        for index in range(metadata.num_row_groups):
            if _may_match(metadata.row_group(index), rounds, direction):
                units.append((cache_dir / entry.name, index))
    return units


def _may_match(
    row_group: pq.RowGroupMetaData, rounds: list[int] | None, direction: str | None
) -> bool:
    stats = {
        row_group.column(i).path_in_schema: row_group.column(i).statistics
        for i in range(row_group.num_columns)
    }

    def overlaps(column: str, values: Iterable[Any]) -> bool:
        stat = stats.get(column)
        if stat is None or not stat.has_min_max:
            return True
        return any(stat.min <= value <= stat.max for value in values)

    return (rounds is None or overlaps("round", rounds)) and (
        direction is None or overlaps("direction", [direction])
    )


def _read_units(
    units: list[tuple[Path, int]],
    columns: list[str] | None,
    batch_rows: int,
    rounds: list[int] | None,
    direction: str | None,
) -> Iterator[pa.RecordBatch]:
    """Filtered batches of the given row groups, holding one row group's pages at a time."""
    wanted = list(columns) if columns is not None else None
    for path, index in units:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        unknown = [name for name in wanted or [] if name not in names]
        if unknown:
            raise CacheError(f"unknown column(s) {unknown}; the cache has {names}")
        read = wanted
        if wanted is not None:  # the filter columns are read even when not returned
            filters = [("round", rounds), ("direction", direction)]
            read = wanted + [name for name, on in filters if on is not None and name not in wanted]
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[index], columns=read):
            batch = _filter(batch, rounds, direction)
            if batch.num_rows:
                yield batch if wanted is None else batch.select(wanted)


def _filter(
    batch: pa.RecordBatch, rounds: list[int] | None, direction: str | None
) -> pa.RecordBatch:
    keep = None
    if rounds is not None:
        keep = pc.is_in(batch["round"], value_set=pa.array(rounds, pa.int16()))
    if direction is not None:
        same = pc.equal(batch["direction"], direction)
        keep = same if keep is None else pc.and_(keep, same)
    return batch if keep is None else batch.filter(keep)


def _rebatch(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup into batches of exactly `batch_rows` rows; holds under 2 x batch_rows rows."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= batch_rows:
            merged = pa.concat_batches(pending) if len(pending) > 1 else pending[0]
            yield merged.slice(0, batch_rows)
            rest = merged.slice(batch_rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_batches(pending) if len(pending) > 1 else pending[0]
