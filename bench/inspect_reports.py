"""Time every inspection preset on a synthetic cache of about 10 million candidate rows.

    .venv/bin/python bench/inspect_reports.py            # temp cache, deleted afterwards
    .venv/bin/python bench/inspect_reports.py --out runs/bench_cache --queries 20000

The cache is written with the real `rows_to_table` / `write_shard` / `write_manifest`; teacher
logits are Gaussian noise plus a positive bonus plus a per-item "hub" bias, so some captions
and images are hard negatives for many queries and some queries have genetic errors.
Goal: every preset under 2 s.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inspection import PRESETS, open_cache
from pipeline.knowledge import derived_columns
from pipeline.shards import CacheManifest, rows_to_table, shard_name, write_manifest, write_shard

CAPTIONS_PER_IMAGE = 5
# Logits = unit Gaussian noise + POSITIVE_BONUS on the positive + a per-item hub bias: about a
# quarter of queries get a genetic error and 2% a positive outside the top K (measured).
POSITIVE_BONUS = 3.5
HUB_SCALE = 0.4
HUB_SHARE, HUB_BOOST = 0.01, 2.0


def hub_bias(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count,) per-item logit offset: mild Gaussian spread plus a few strong hubs."""
    bias = HUB_SCALE * rng.standard_normal(count, dtype=np.float32)
    bias[rng.random(count) < HUB_SHARE] += HUB_BOOST
    return bias


def group_scores(
    rng: np.random.Generator,
    image_ids: np.ndarray,
    caption_ids: np.ndarray,
    image_hub: np.ndarray,
    caption_hub: np.ndarray,
) -> np.ndarray:
    """(n_groups, G, G) teacher logits: [g, i, j] scores image i against caption j of group g."""
    n_groups, group_size = image_ids.shape
    scores = rng.standard_normal((n_groups, group_size, group_size), dtype=np.float32)
    scores += POSITIVE_BONUS * np.eye(group_size, dtype=np.float32)
    scores += caption_hub[caption_ids][:, None, :]  # a hub caption is close to every image
    scores += image_hub[image_ids][:, :, None]
    return scores


def direction_rows(
    rng: np.random.Generator,
    scores: np.ndarray,
    query_ids: np.ndarray,
    other_ids: np.ndarray,
    keep: int,
) -> dict[str, np.ndarray]:
    """Cache columns for the queries along axis 1 of `scores` (n_groups, G, G)."""
    n_groups, group_size, _ = scores.shape
    logits = scores.reshape(-1, group_size)  # (Q, G): query (g, i) against candidate j
    own = np.tile(np.arange(group_size), n_groups)

    # Draw order: the positive first, the negatives in a random order.
    keys = rng.random(logits.shape, dtype=np.float32)
    keys[np.arange(len(own)), own] = -1.0
    order = np.argsort(keys, axis=1)
    group_of = np.repeat(np.arange(n_groups), group_size)
    candidate_ids = other_ids[group_of[:, None], order]
    candidate_logits = np.take_along_axis(logits, order, axis=1)
    return {
        "group_id": group_of,
        "query_ids": query_ids.ravel(),
        "positive_ids": candidate_ids[:, 0],
        "candidate_ids": candidate_ids,
        "candidate_logits": candidate_logits,
        **derived_columns(candidate_ids, candidate_logits, keep),
    }


def write_synthetic_cache(
    out: Path,
    queries: int,
    group_size: int = 64,
    keep: int = 8,
    rounds: int = 2,
    seed: int = 0,
    shard_rows: int = 40_000,
) -> int:
    """Write a synthetic cache of at least `queries` queries; returns the number written."""
    rng = np.random.default_rng(seed)
    groups_per_round = math.ceil(queries / (2 * group_size * rounds))
    n_images = groups_per_round * group_size
    image_hub = hub_bias(rng, n_images)
    caption_hub = hub_bias(rng, n_images * CAPTIONS_PER_IMAGE)
    shards, written = [], 0
    for round_index in range(rounds):
        image_ids = rng.permutation(n_images).reshape(groups_per_round, group_size)
        caption_ids = image_ids * CAPTIONS_PER_IMAGE + rng.integers(
            0, CAPTIONS_PER_IMAGE, image_ids.shape
        )
        scores = group_scores(rng, image_ids, caption_ids, image_hub, caption_hub)
        for direction, block in (("tr", scores), ("ir", scores.transpose(0, 2, 1))):
            query_ids, other_ids = (
                (image_ids, caption_ids) if direction == "tr" else (caption_ids, image_ids)
            )
            columns = direction_rows(rng, np.ascontiguousarray(block), query_ids, other_ids, keep)
            for start in range(0, len(columns["query_ids"]), shard_rows):
                part = {
                    name: values[start : start + shard_rows] for name, values in columns.items()
                }
                table = rows_to_table(round_index, direction, **part)
                shards.append(write_shard(table, out / shard_name(len(shards))))
                written += table.num_rows
    write_manifest(
        out,
        CacheManifest(
            fingerprints={"dataset": "synthetic", "teacher": "synthetic", "tokenizer": "none"},
            group_size=group_size,
            keep=keep,
            rounds=rounds,
            seed=seed,
            code_version="bench",
            config={"queries": queries},
            shards=shards,
        ),
    )
    return written


def time_reports(cache: Path) -> list[tuple[str, float, int]]:
    """(name, seconds, result rows) of each preset, plus a full scan of the candidates view."""
    con = open_cache(cache)
    timings = []
    for name, report in PRESETS.items():
        start = time.perf_counter()
        rows = report(con).num_rows
        timings.append((name, time.perf_counter() - start, rows))
    start = time.perf_counter()
    scan = con.execute(
        "SELECT count(*), sum(teacher_rank), count(*) FILTER (in_topk) FROM candidates"
    ).fetchall()[0]
    timings.append((f"(candidates view scan: {scan[0]:,} rows)", time.perf_counter() - start, 1))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="cache folder to (re)write; default: a temp dir")
    parser.add_argument("--queries", type=int, default=156_250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dcd_bench_"))
    try:
        if args.out:
            shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        written = write_synthetic_cache(out, args.queries, seed=args.seed)
        bytes_on_disk = sum(path.stat().st_size for path in out.glob("shard-*.parquet"))
        print(
            f"generated {written:,} queries = {written * 64:,} candidate rows, "
            f"{bytes_on_disk / 2**20:.0f} MiB, in {time.perf_counter() - start:.1f} s"
        )
        timings = time_reports(out)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    width = max(len(name) for name, _, _ in timings)
    print(f"{'preset':<{width}}  seconds  rows")
    for name, seconds, rows in timings:
        print(f"{name:<{width}}  {seconds:7.3f}  {rows}")
    slowest = max(timings[:-1], key=lambda item: item[1])
    print(f"max preset time: {slowest[1]:.3f} s ({slowest[0]}; goal < 2 s)")


if __name__ == "__main__":
    main()
