"""Teacher-stage throughput: the cache stage against a bare teacher forward, and Ray scaling.

    .venv/bin/python bench/cache_throughput.py                 # random-init `shapes` teacher
    .venv/bin/python bench/cache_throughput.py --teacher runs/teacher-shapes/model --groups 4

(1) pairs/s of `stages.cache.run` with one Ray actor of --threads torch threads on the first
    --groups groups (G = --group-size) of the shapes train split, against the bare teacher
    forward `model(input_ids, attention_mask, pixel_values, pixel_mask)` over the same G x G
    pairs per group, in calls of --pairs-per-batch pairs as the stage makes them (default 256),
    in this process with the same threads. Goal >= 0.8.
(2) the stage with 2 actors x 1 thread against 1 actor x 1 thread on the same groups.
    Goal: speedup >= 1.8 (needs two idle cores).

What is timed: Ray is started and warmed by a throwaway one-group stage run first. Each timed
stage run writes a fresh folder and is timed by the stage itself (`seconds` in its summary:
actor start-up, model and data loading, scoring, selection and Parquet writing; planning and
the manifest excluded). Actors are not reused between runs, so that time still holds their
start-up; the "net" figures subtract the start-up of the same actors measured on their own
(time until `workers` ShardWorker actors are ready). The bare forward times the model calls
only. Ratios print last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import DataConfig, dataset_spec, open_data
from pipeline.groups import make_groups
from pipeline.models import build_model, load_model, save_model
from pipeline.parallel import init_ray
from pipeline.runtime import set_threads
from stages.cache import CacheConfig, ShardWorker, run

SEED = 0


def stage_seconds(base: CacheConfig, out: Path, workers: int, threads: int) -> float:
    """The stage's own time for one fresh run with `workers` actors x `threads` threads."""
    config = base.model_copy(update={"out": out, "workers": workers, "threads": threads})
    summary = run(config)
    assert summary["shards_written"] == summary["shards"], summary
    return summary["seconds"]


def actor_startup_seconds(base: CacheConfig, workers: int, threads: int) -> float:
    """Seconds until `workers` ShardWorker actors (model and data loaded) are ready."""
    actor = ray.remote(num_cpus=threads)(ShardWorker)
    start = time.perf_counter()
    actors = [
        actor.remote(str(base.teacher), base.data, (base.split,), threads, "cpu")
        for _ in range(workers)
    ]
    ray.get([a.__ray_ready__.remote() for a in actors])
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    time.sleep(2.0)  # let Ray release the actors' CPUs before the next run asks for them
    return seconds


@torch.inference_mode()
def bare_forward_seconds(base: CacheConfig, threads: int) -> float:
    """Model calls only: the G x G pairs of each group in calls of the stage's pass size,
    nothing shared (every pair embeds its image again)."""
    set_threads(threads)
    model = load_model(base.teacher)
    data = open_data(base.data, (base.split,))
    groups = make_groups(data.split(base.split), base.group_size, base.seed, 0)[: base.max_groups]
    size = base.group_size
    total = 0.0
    for group in torch.from_numpy(groups):
        image_ids = group[:, 0].repeat_interleave(size)  # (G * G,) row-major
        caption_ids = group[:, 1].repeat(size)
        for first in range(0, size * size, base.pairs_per_batch):
            chunk = slice(first, first + base.pairs_per_batch)
            pixel_values, pixel_mask = data.images.batch(image_ids[chunk].tolist())
            input_ids, attention_mask = data.captions.batch(caption_ids[chunk])
            start = time.perf_counter()
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                pixel_mask=pixel_mask,
            ).logits
            total += time.perf_counter() - start
            assert torch.isfinite(logits).all()
    return total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher",
        type=Path,
        help="teacher folder (default: random-init `shapes` preset saved to a temporary folder)",
    )
    parser.add_argument("--group-size", type=int, default=64, help="G (default 64)")
    parser.add_argument("--groups", type=int, default=8, help="groups scored (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for (1)")
    parser.add_argument(
        "--pairs-per-batch", type=int, default=256, help="pairs per forward pass (default 256)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dcd-bench-") as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or save_model(build_model("shapes", seed=SEED), tmp / "teacher")
        data = DataConfig(max_tokens=24)
        dataset_spec(data)  # generates the shapes benchmark if it is missing
        # groups_per_shard=1: two actors can share the groups one by one
        base = CacheConfig(
            teacher=teacher,
            data=data,
            group_size=args.group_size,
            keep=min(8, args.group_size - 1),
            seed=SEED,
            groups_per_shard=1,
            max_groups=args.groups,
            device="cpu",
            pairs_per_batch=args.pairs_per_batch,
        )
        pairs = args.groups * args.group_size**2
        print(
            f"teacher {teacher}, G={args.group_size}, {args.groups} groups = {pairs} pairs, "
            f"{args.pairs_per_batch} pairs per forward pass"
        )

        init_ray()
        stage_seconds(base.model_copy(update={"max_groups": 1}), tmp / "warmup", 1, 1)
        times = {}
        times["stage", 1, args.threads] = stage_seconds(base, tmp / "s1", 1, args.threads)
        times["start", 1, args.threads] = actor_startup_seconds(base, 1, args.threads)
        if args.threads != 1:
            times["stage", 1, 1] = stage_seconds(base, tmp / "s1x1", 1, 1)
            times["start", 1, 1] = actor_startup_seconds(base, 1, 1)
        times["stage", 2, 1] = stage_seconds(base, tmp / "s2x1", 2, 1)
        times["start", 2, 1] = actor_startup_seconds(base, 2, 1)
        ray.shutdown()
        bare = bare_forward_seconds(base, args.threads)

    def rate(workers: int, threads: int, net: bool = False) -> float:
        seconds = times["stage", workers, threads]
        if net:
            seconds -= times["start", workers, threads]
        return pairs / seconds if seconds > 0 else float("nan")

    for (kind, workers, threads), seconds in sorted(times.items()):
        label = "stage run" if kind == "stage" else "actor start-up"
        print(f"{label:15s} {workers} worker(s) x {threads} thread(s): {seconds:7.1f} s")
    for workers, threads in sorted({(w, t) for _, w, t in times}):
        print(
            f"stage {workers}x{threads}: {rate(workers, threads):8.1f} pairs/s, "
            f"net of start-up {rate(workers, threads, True):8.1f} pairs/s"
        )
    print(f"bare forward, {args.threads} thread(s): {bare:7.1f} s, {pairs / bare:8.1f} pairs/s")

    t = args.threads
    ratio, ratio_net = rate(1, t) * bare / pairs, rate(1, t, True) * bare / pairs
    speedup, speedup_net = rate(2, 1) / rate(1, 1), rate(2, 1, True) / rate(1, 1, True)
    print(
        f"RATIO stage/bare forward (1 worker x {t} thread(s)): {ratio:.2f} "
        f"(net of start-up {ratio_net:.2f}); goal >= 0.8"
    )
    print(
        f"SPEEDUP 2 workers x 1 thread vs 1 x 1: {speedup:.2f} "
        f"(net of start-up {speedup_net:.2f}); goal >= 1.8"
    )


if __name__ == "__main__":
    main()
