"""The teacher stage: score in-batch groups once, in parallel, and cache the knowledge in Parquet.

    dcd teacher cache configs/cache_shapes.yaml

The training split is cut into groups of G distinct images with one caption each (`rounds`
independent shufflings). Ray actors each load the teacher once, score a shard's groups (G x G
pairs per group, both directions from one matrix), derive the knowledge-adjusted top M' + 1,
ranks and entropies, and write the shard under a temporary name. A rerun skips finished shards;
a cache made with another config, dataset, teacher or tokenizer is refused, never mixed.
"""

from __future__ import annotations

import logging
import re
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field, model_validator
from ray.util import ActorPool
from tqdm import tqdm

from pipeline.config import StrictModel, save_resolved
from pipeline.data import DataConfig, dataset_spec
from pipeline.fsio import sha256_file
from pipeline.groups import GroupError, make_groups
from pipeline.knowledge import group_table
from pipeline.models import teacher_fingerprint
from pipeline.parallel import Scorer, init_ray
from pipeline.shards import (
    CacheError,
    CacheManifest,
    ShardEntry,
    check_compatible,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from pipeline.text import load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

# fields that change how the cache is computed, not what it holds
_RUNTIME_FIELDS = {"out", "workers", "threads", "ray_address", "device", "pairs_per_batch"}
# temporaries of shards, manifest and config written through pipeline.fsio.atomic_path
_TEMPORARY = re.compile(r"\.(shard-\d{5}\.parquet|manifest\.json|config\.yaml)\.\d+\.tmp")


class CacheConfig(StrictModel):
    teacher: Path = Path("models/shapes-teacher")
    data: DataConfig = Field(default_factory=DataConfig)
    split: str = "train"
    out: Path = Path("runs/cache")
    group_size: int = Field(default=64, ge=2)  # G = M + 1 candidates per query
    keep: int = Field(default=8, ge=2)  # M' + 1 candidates kept after selection
    rounds: int = Field(default=1, ge=1)
    seed: int = 0
    groups_per_shard: int = Field(default=8, ge=1)
    max_groups: int | None = Field(default=None, ge=1)  # per round; for quick runs
    workers: int = Field(default=2, ge=0)  # Ray actors; 0 scores in this process
    threads: int = Field(default=1, ge=1)  # torch CPU threads per actor
    ray_address: str | None = None
    device: str = "auto"
    pairs_per_batch: int = Field(default=256, gt=0)  # pairs per teacher forward pass

    @model_validator(mode="after")
    def _keep_below_group(self) -> CacheConfig:
        if self.keep >= self.group_size:
            raise ValueError(
                f"keep ({self.keep}) must be smaller than group_size ({self.group_size}): "
                "M' must be below M = G - 1"
            )
        return self


class ShardWorker(Scorer):
    """Scores a shard's groups and writes the shard (as a Ray actor, or in process)."""

    def write(
        self, task: dict, out_dir: str, keep: int, seed: int, pairs_per_batch: int | None = None
    ) -> dict:
        logits = self.group_matrices(task["groups"], pairs_per_batch)  # (n, G, G)
        rng = np.random.default_rng([seed, task["round"], task["index"]])
        tables = [
            group_table(group, matrix, task["round"], task["first_group"] + offset, keep, rng)
            for offset, (group, matrix) in enumerate(zip(task["groups"], logits))
        ]
        entry = write_shard(pa.concat_tables(tables), Path(out_dir) / shard_name(task["index"]))
        return entry.model_dump()


def plan_shards(config: CacheConfig) -> tuple[list[dict], str]:
    """Shard tasks over all rounds (index, round, first_group, groups) and the data fingerprint."""
    split = dataset_spec(config.data).load(config.data.restval_as_train).split(config.split)
    tasks = []
    for round_index in range(config.rounds):
        try:
            groups = make_groups(split, config.group_size, config.seed, round_index)
        except GroupError as err:
            raise GroupError(f"config group_size={config.group_size}: {err}") from None
        groups = groups[: config.max_groups]
        for first in range(0, len(groups), config.groups_per_shard):
            tasks.append(
                {
                    "index": len(tasks),
                    "round": round_index,
                    "first_group": first,
                    "groups": groups[first : first + config.groups_per_shard],
                }
            )
    return tasks, split.fingerprint()


def wanted_manifest(config: CacheConfig, data_fingerprint: str) -> CacheManifest:
    tokenizer = load_tokenizer(config.data.tokenizer)
    return CacheManifest(
        fingerprints={
            "dataset": data_fingerprint,
            "teacher": teacher_fingerprint(config.teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
        group_size=config.group_size,
        keep=config.keep,
        rounds=config.rounds,
        seed=config.seed,
        code_version=version("dcd"),
        config=config.model_dump(mode="json", exclude=_RUNTIME_FIELDS | {"teacher"}),
    )


def _run_tasks(config: CacheConfig, todo: list[dict]) -> None:
    """Score and write the shards in `todo`, with a progress bar over groups."""
    out, splits = str(config.out), (config.split,)
    bar = tqdm(
        total=sum(len(t["groups"]) for t in todo),
        desc="cache",
        unit="group",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    if config.workers == 0:
        worker = ShardWorker(
            str(config.teacher), config.data, splits, config.threads, config.device
        )
        for task in todo:
            worker.write(task, out, config.keep, config.seed, config.pairs_per_batch)
            bar.update(len(task["groups"]))
    else:
        init_ray(config.ray_address)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= config.workers else 0
        actor = ray.remote(num_cpus=config.threads, num_gpus=gpus)(ShardWorker)
        actors = [
            actor.remote(str(config.teacher), config.data, splits, config.threads, config.device)
            for _ in range(config.workers)
        ]
        pool = ActorPool(actors)
        sizes = {t["index"]: len(t["groups"]) for t in todo}
        for entry in pool.map_unordered(
            lambda a, t: a.write.remote(t, out, config.keep, config.seed, config.pairs_per_batch),
            todo,
        ):
            bar.update(sizes[int(entry["name"][6:11])])
    bar.close()


def run(config: CacheConfig) -> dict:
    """Build (or finish) the cache in `config.out`; returns a summary."""
    out = Path(config.out)
    tasks, data_fingerprint = plan_shards(config)
    if not tasks:
        raise CacheError(f"no groups of size {config.group_size} in split {config.split}")
    wanted = wanted_manifest(config, data_fingerprint)
    listed: dict[str, ShardEntry] = {}
    if (out / "manifest.json").is_file():
        existing = read_manifest(out)
        check_compatible(existing, wanted, cache_dir=str(out), ignore=("shards",))
        listed = {entry.name: entry for entry in existing.shards}
    else:
        write_manifest(out, wanted)
    save_resolved(config, out)
    _remove_stale_temporaries(out)

    # a shard file exists only when complete; one the manifest lists must still match it
    todo = [t for t in tasks if not _finished(out / shard_name(t["index"]), listed)]
    log.info(
        "cache: %d shards planned, %d done, %d to write",
        len(tasks),
        len(tasks) - len(todo),
        len(todo),
    )
    start = time.perf_counter()
    if todo:
        _run_tasks(config, todo)
    seconds = time.perf_counter() - start

    entries = [
        _entry(out / shard_name(t["index"]), 2 * config.group_size * len(t["groups"]))
        for t in tasks
    ]
    write_manifest(out, wanted.model_copy(update={"shards": entries}))
    groups = sum(len(t["groups"]) for t in todo)
    pairs = groups * config.group_size**2
    summary = {
        "out": str(out),
        "shards": len(tasks),
        "shards_written": len(todo),
        "groups": groups,
        "pairs": pairs,
        "rows": sum(e.rows for e in entries),
        "bytes": sum(e.bytes for e in entries),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(pairs / seconds, 1) if seconds > 0 and pairs else None,
    }
    log.info(
        "cache: %(groups)d groups, %(pairs)d pairs, %(shards)d shards, %(bytes)d bytes, "
        "%(seconds).1f s, %(pairs_per_s)s pairs/s",
        summary,
    )
    return summary


def _finished(path: Path, listed: dict[str, ShardEntry]) -> bool:
    """Whether a shard can be kept: on disk and, if the manifest lists it, unchanged since.

    Without the check a rerun would re-hash a truncated or edited shard into the manifest and
    `verify_cache` could no longer see the damage; such a shard is rewritten instead.
    """
    if not path.is_file():
        return False
    entry = listed.get(path.name)
    if entry is None or (path.stat().st_size == entry.bytes and sha256_file(path) == entry.sha256):
        return True
    log.warning("cache: %s differs from the manifest (truncated or modified); rewriting it", path)
    return False


def _remove_stale_temporaries(out: Path) -> None:
    """Delete what a killed run left half-written (`.NAME.PID.tmp` from `atomic_path`).

    One run per cache directory at a time: a concurrent run's temporaries would go too.
    """
    for path in out.glob(".*.tmp"):
        if _TEMPORARY.fullmatch(path.name):
            log.info("cache: removing %s, left by an interrupted run", path.name)
            path.unlink(missing_ok=True)


def _entry(path: Path, rows: int) -> ShardEntry:
    return ShardEntry(
        name=path.name, rows=rows, sha256=sha256_file(path), bytes=path.stat().st_size
    )
