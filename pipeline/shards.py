"""The knowledge cache on disk: Parquet shards of teacher scores plus a manifest.

One row per (round, direction, query). A *group* is G distinct images with one caption each;
the teacher scores its G x G matrix once. Image rows give text-retrieval ("tr") queries,
caption columns give image-retrieval ("ir") queries. Mapping to the paper: G = M + 1
candidates, K = M' + 1 kept by knowledge-adjusted (KA) selection.

Check a finished cache (an empty list means it is sound):

    python -c "from pipeline.shards import verify_cache; print(verify_cache('runs/cache'))"
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.fsio import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DIRECTIONS = ("tr", "ir")
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
# Fixed so that the same table always gives the same bytes; also the unit of streaming memory:
# 8192 rows x G=64 is about 7 MB decoded.
ROW_GROUP_ROWS = 8192
# fmt: off
SCALAR_COLUMNS = ("round", "direction", "group_id", "query_id", "positive_id", "positive_rank",
                  "entropy", "positive_prob")
# fmt: on
_SHARD_NAME = re.compile(r"shard-\d{5}\.parquet")
# Byte-stream split lets zstd see the exponent bytes of float32 together: smaller shards.
_FLOAT_COLUMNS = ["candidate_logits", "topk_logits", "entropy", "positive_prob"]


class CacheError(ValueError):
    """The cache on disk, or a table meant for it, breaks the format or does not fit this run."""


def cache_schema(group_size: int, keep: int) -> pa.Schema:
    """The Arrow schema of a cache with G = `group_size` candidates and K = `keep` kept ones."""
    if not 1 <= keep <= group_size:
        raise CacheError(f"keep must be in 1..group_size, got keep={keep}, group_size={group_size}")

    def fixed(name: str, value: pa.DataType, width: int) -> pa.Field:
        return pa.field(name, pa.list_(pa.field("element", value, nullable=False), width), False)

    fields = [
        pa.field("round", pa.int16(), False),
        pa.field("direction", pa.dictionary(pa.int8(), pa.string()), False),
        pa.field("group_id", pa.int32(), False),
        pa.field("query_id", pa.int64(), False),
        pa.field("positive_id", pa.int64(), False),
        fixed("candidate_ids", pa.int64(), group_size),
        fixed("candidate_logits", pa.float32(), group_size),
        fixed("topk_ids", pa.int64(), keep),
        fixed("topk_logits", pa.float32(), keep),
        pa.field("positive_rank", pa.int16(), False),
        pa.field("entropy", pa.float32(), False),
        pa.field("positive_prob", pa.float32(), False),
    ]
    metadata = {
        "dcd.schema_version": str(SCHEMA_VERSION),
        "dcd.group_size": str(group_size),
        "dcd.keep": str(keep),
    }
    return pa.schema(fields, metadata=metadata)


def schema_sizes(schema: pa.Schema) -> tuple[int, int]:
    """(G, K) read back from a cache schema's metadata."""
    meta = schema.metadata or {}
    if meta.get(b"dcd.schema_version") != str(SCHEMA_VERSION).encode():
        raise CacheError(f"not a dcd cache schema of version {SCHEMA_VERSION}: metadata {meta}")
    return int(meta[b"dcd.group_size"]), int(meta[b"dcd.keep"])


# ----------------------------------------------------------------------------- rows


def rows_to_table(
    round: int | np.ndarray,
    direction: str | Sequence[str] | np.ndarray,
    group_id: int | np.ndarray,
    query_ids: np.ndarray,
    positive_ids: np.ndarray,
    candidate_ids: np.ndarray,
    candidate_logits: np.ndarray,
    topk_ids: np.ndarray,
    topk_logits: np.ndarray,
    positive_rank: np.ndarray,
    entropy: np.ndarray,
    positive_prob: np.ndarray,
) -> pa.Table:
    """Validated cache rows for Q queries as a table of `cache_schema(G, K)`.

    `round`, `direction`, `group_id`: one value for all rows or (Q,); `query_ids`,
    `positive_ids`, `positive_rank`, `entropy`, `positive_prob`: (Q,); `candidate_ids`,
    `candidate_logits`: (Q, G) in draw order, column 0 the positive; `topk_ids`,
    `topk_logits`: (Q, K) as `pipeline.selection.select_candidates` defines them (with KA).
    Raises CacheError naming the column (and query id) on a wrong shape or dtype, non-finite
    values or a broken contract (positive not first, top-K scores not descending).
    """
    query_ids = _ints("query_ids", query_ids, 1)
    num_queries = len(query_ids)
    cand_ids = _ints("candidate_ids", candidate_ids, 2, num_queries)
    group_size = cand_ids.shape[1]
    keep = np.shape(topk_logits)[1] if np.ndim(topk_logits) == 2 else -1
    columns = {
        "round": _broadcast_ints("round", round, num_queries, np.int16),
        "direction": _directions(direction, num_queries),
        "group_id": _broadcast_ints("group_id", group_id, num_queries, np.int32),
        "query_id": query_ids,
        "positive_id": _ints("positive_ids", positive_ids, 1, num_queries),
        "candidate_ids": cand_ids,
        "candidate_logits": _floats(
            "candidate_logits", candidate_logits, (num_queries, group_size)
        ),
        "topk_ids": _ints("topk_ids", topk_ids, 2, num_queries, keep),
        "topk_logits": _floats("topk_logits", topk_logits, (num_queries, keep)),
        "positive_rank": _ints("positive_rank", positive_rank, 1, num_queries).astype(np.int16),
        "entropy": _floats("entropy", entropy, (num_queries,)),
        "positive_prob": _floats("positive_prob", positive_prob, (num_queries,)),
    }
    for name, values in columns.items():
        if name not in ("direction", "query_id") and values.dtype.kind == "f":
            _check_finite(name, values, query_ids)
    _check_contract(columns, group_size)
    schema = cache_schema(group_size, keep)
    arrays = [_to_arrow(columns[field.name], field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _shape_error(name: str, values: np.ndarray, expected: str) -> CacheError:
    return CacheError(f"{name}: expected shape {expected}, got {np.shape(values)}")


def _ints(
    name: str, values: Any, ndim: int, rows: int | None = None, width: int | None = None
) -> np.ndarray:
    array = np.asarray(values)
    if (
        array.ndim != ndim
        or (rows is not None and len(array) != rows)
        or (width is not None and array.shape[1] != width)
    ):
        expected = "(Q,)" if ndim == 1 else f"(Q, {width or 'G'})"
        raise _shape_error(name, array, f"{expected} with Q={rows}")
    if array.dtype.kind not in "iu":
        raise CacheError(f"{name}: expected integer ids/values, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _floats(name: str, values: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != shape:
        raise _shape_error(name, array, str(shape))
    if array.dtype.kind != "f":
        raise CacheError(f"{name}: expected floating-point values, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _broadcast_ints(name: str, values: Any, rows: int, dtype: type) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 0:
        array = np.full(rows, array)
    checked = _ints(name, array, 1, rows)
    info = np.iinfo(dtype)
    if len(checked) and (checked.min() < info.min or checked.max() > info.max):
        raise CacheError(f"{name}: values must fit {np.dtype(dtype).name}")
    return checked.astype(dtype)


def _directions(direction: Any, rows: int) -> np.ndarray:
    values = np.full(rows, direction) if isinstance(direction, str) else np.asarray(direction)
    if values.shape != (rows,):
        raise _shape_error("direction", values, f"(Q,) with Q={rows}")
    unknown = sorted(set(values.tolist()) - set(DIRECTIONS))
    if unknown:
        raise CacheError(f"direction: expected 'tr' or 'ir', got {unknown[:3]}")
    return (values == "ir").astype(np.int8)  # dictionary codes into DIRECTIONS


def _check_finite(name: str, values: np.ndarray, query_ids: np.ndarray) -> None:
    finite = np.isfinite(values)
    bad_rows = np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))
    if len(bad_rows):
        row = bad_rows[0]
        raise CacheError(
            f"{name}: non-finite value for query_id {query_ids[row]} (row {row}; "
            f"{len(bad_rows)} bad rows in all): {values[row]!r}. The teacher produced NaN/inf; "
            "check its precision (fp16 overflow) and inputs before caching."
        )


def _check_contract(columns: dict[str, np.ndarray], group_size: int) -> None:
    positives = columns["positive_id"]
    for name in ("candidate_ids", "topk_ids"):
        wrong = np.flatnonzero(columns[name][:, 0] != positives)
        if len(wrong):
            raise CacheError(
                f"{name}: column 0 must be the positive; query_id "
                f"{columns['query_id'][wrong[0]]} has {columns[name][wrong[0], 0]}, "
                f"positive_id {positives[wrong[0]]}"
            )
    unsorted = np.flatnonzero((np.diff(columns["topk_logits"], axis=1) > 0).any(axis=1))
    if len(unsorted):
        raise CacheError(
            f"topk_logits: must be sorted descending (KA scores); query_id "
            f"{columns['query_id'][unsorted[0]]} is not"
        )
    rank = columns["positive_rank"]
    if len(rank) and (rank.min() < 1 or rank.max() > group_size):
        raise CacheError(
            f"positive_rank: must lie in 1..{group_size}, got {rank.min()}..{rank.max()}"
        )


def _to_arrow(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(arrow_type):
        return pa.DictionaryArray.from_arrays(pa.array(values, pa.int8()), pa.array(DIRECTIONS))
    if pa.types.is_fixed_size_list(arrow_type):
        flat = pa.array(np.ascontiguousarray(values).ravel())
        return pa.FixedSizeListArray.from_arrays(flat, type=arrow_type)
    return pa.array(values, arrow_type)


# ----------------------------------------------------------------------------- shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    rows: int
    sha256: str
    bytes: int


def write_shard(table: pa.Table, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> ShardEntry:
    """Write a `rows_to_table` table as one zstd Parquet shard, atomically and byte-reproducibly.

    Returns the manifest entry (name, rows, sha256, bytes) for the shard.
    """
    path = Path(path)
    if not _SHARD_NAME.fullmatch(path.name):
        raise CacheError(f"{path}: shard files must be named like {shard_name(0)} (shard_name())")
    group_size, keep = schema_sizes(table.schema)
    if not table.schema.equals(cache_schema(group_size, keep), check_metadata=True):
        raise CacheError(
            f"{path}: table does not have the cache schema; build it with rows_to_table"
        )
    # Page boundaries follow the in-memory chunking, so one chunk per column fixes the bytes.
    table = table.combine_chunks()
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_rows,
            compression="zstd",
            compression_level=3,
            use_dictionary=["direction"],
            write_statistics=list(SCALAR_COLUMNS),
            use_byte_stream_split=_FLOAT_COLUMNS,
        )
        entry = ShardEntry(
            name=path.name, rows=table.num_rows, sha256=sha256_file(tmp), bytes=tmp.stat().st_size
        )
    log.debug("wrote %s: %d rows, %d bytes", path, entry.rows, entry.bytes)
    return entry


# ----------------------------------------------------------------------------- manifest

_FINGERPRINT_KEYS = ("dataset", "teacher", "tokenizer")


class CacheManifest(BaseModel):
    """manifest.json: what a cache holds and what produced it."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    fingerprints: dict[str, str]
    group_size: int
    keep: int
    rounds: int
    seed: int
    code_version: str
    config: dict[str, Any] = {}
    shards: list[ShardEntry] = []

    @field_validator("fingerprints")
    @classmethod
    def _has_fingerprints(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [key for key in _FINGERPRINT_KEYS if key not in value]
        if missing:
            raise ValueError(f"missing fingerprint(s) {missing}; need {list(_FINGERPRINT_KEYS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CacheManifest:
        cache_schema(self.group_size, self.keep)  # raises on keep outside 1..G
        names = [shard.name for shard in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("a shard is listed twice in shards")
        return self


def read_manifest(cache_dir: Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(
            f"{path}: no manifest; not a dcd cache, or its teacher stage never finished a shard"
        )
    try:
        return CacheManifest.model_validate_json(path.read_text())
    except ValidationError as err:
        raise CacheError(f"{path}: invalid manifest: {err}") from None


def write_manifest(cache_dir: Path, manifest: CacheManifest) -> None:
    write_json(Path(cache_dir) / MANIFEST_NAME, manifest.model_dump(mode="json"))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(f"{prefix}.{key}", item))
    return flat


def check_compatible(
    existing: CacheManifest,
    wanted: CacheManifest,
    cache_dir: Path | str = "the cache directory",
    ignore: Collection[str] = (),
) -> None:
    """Raise CacheError naming every field where `wanted` (this run) differs from the cache.

    `shards` never counts; `ignore` names more top-level fields to skip (e.g. "rounds" for a
    run that adds rounds to a cache).
    """
    have = existing.model_dump(exclude={"shards", *ignore})
    want = wanted.model_dump(exclude={"shards", *ignore})
    lines = []
    for field in have:
        old, new = _flatten(field, have[field]), _flatten(field, want[field])
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                label = f"{key.split('.', 1)[1]} fingerprint" if field == "fingerprints" else key
                lines.append(
                    f"{label} differs: cache has {old.get(key)!r}, this run has {new.get(key)!r}"
                )
    if lines:
        raise CacheError(
            f"existing cache in {cache_dir} does not match this run:\n  "
            + "\n  ".join(lines)
            + f"\nuse a new --out or delete {cache_dir}"
        )


# ----------------------------------------------------------------------------- verification


def verify_cache(cache_dir: Path, deep: bool = False) -> list[str]:
    """One problem line per bad item (shard, stray file or manifest); empty when the cache is sound.

    `deep` also decodes every page, which the sha256 check makes redundant unless the manifest
    itself was rewritten.
    """
    cache_dir = Path(cache_dir)
    try:
        manifest = read_manifest(cache_dir)
    except CacheError as err:
        return [str(err)]
    problems = []
    if manifest.schema_version != SCHEMA_VERSION:
        problems.append(
            f"{MANIFEST_NAME}: schema_version {manifest.schema_version}, this code "
            f"reads {SCHEMA_VERSION}; rebuild the cache"
        )
    expected = cache_schema(manifest.group_size, manifest.keep)
    for entry in manifest.shards:
        found = _shard_problems(cache_dir / entry.name, entry, expected, deep)
        if found:
            problems.append(f"{entry.name}: " + "; ".join(found))
    listed = {entry.name for entry in manifest.shards}
    for path in sorted(cache_dir.iterdir()):
        if path.name.endswith((".tmp", ".old")):
            problems.append(
                f"{path.name}: stray temporary file from an interrupted write; delete it"
            )
        elif path.match(SHARD_GLOB) and path.name not in listed:
            problems.append(
                f"{path.name}: shard not listed in {MANIFEST_NAME}; readers of "
                f"{SHARD_GLOB} would count it: delete it or rebuild the cache"
            )
    return problems


def _shard_problems(path: Path, entry: ShardEntry, expected: pa.Schema, deep: bool) -> list[str]:
    if not path.is_file():
        return ["missing (listed in manifest)"]
    found = []
    size = path.stat().st_size
    if size != entry.bytes:
        found.append(f"{size} bytes on disk, manifest says {entry.bytes} (truncated or rewritten)")
    if sha256_file(path) != entry.sha256:
        found.append("sha256 mismatch: the file changed after it was written")
    try:
        parquet = pq.ParquetFile(path)
        if deep:
            for index in range(parquet.num_row_groups):
                parquet.read_row_group(index)
    except (OSError, pa.ArrowException) as err:
        return found + [f"unreadable Parquet ({err})"]
    if parquet.metadata.num_rows != entry.rows:
        found.append(f"{parquet.metadata.num_rows} rows, manifest says {entry.rows}")
    mismatch = _schema_mismatch(parquet.schema_arrow, expected)
    return found + ([mismatch] if mismatch else [])


def _schema_mismatch(actual: pa.Schema, expected: pa.Schema) -> str | None:
    if actual.equals(expected) and actual.metadata == expected.metadata:
        return None
    if actual.names != expected.names:
        return f"schema mismatch: columns {actual.names}, expected {expected.names}"
    for have, want in zip(actual, expected, strict=True):
        if not have.equals(want):
            return f"schema mismatch: column {have.name} is {have.type}, expected {want.type}"
    return f"schema mismatch: metadata {actual.metadata}, expected {expected.metadata}"
