"""What the knowledge cache saves the student stage, on the shapes data, in one run.

    .venv/bin/python bench/student_costs.py               # random 12-layer teacher, temp dir
    .venv/bin/python bench/student_costs.py --teacher models/shapes-teacher --groups 8 \
        --out runs/bench_student

A `shapes`-preset teacher (random init, or --teacher) scores --groups groups of G = 64 with
`stages.cache.run` (in process, one thread): the 1x cache; the 4x cache lists its shard 4 times.
Students (6 of the 12 layers, K = 32 queries x M' + 1 = 8 candidates out of M + 1 = 64) train
one epoch of the 1x cache with `stages.student.run`, evaluation and separability off:

  (1) online DCD epoch time / cached DCD epoch time (the teacher scores K x 64 pairs per step
      online); goal >= 4;
  (2) cached DCD step time / fine-tune step time, same M' (median over steps); goal <= 1.15;
  (3) peak RSS of a cached DCD epoch over the 4x cache / over the 1x cache, each in a fresh
      spawned process (ru_maxrss at its end); goal <= 1.1.

Ratios are printed last. Timings on a shared CPU are noisy; (3) only means something when the
cache is large next to the process (the script prints both sizes).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402 (after the sys.path insert)
from pipeline.models import build_model, save_model  # noqa: E402
from pipeline.runtime import setup_logging  # noqa: E402
from pipeline.shards import read_manifest, shard_name, write_manifest  # noqa: E402
from stages import cache, student  # noqa: E402

log = logging.getLogger("bench.student_costs")

GROUP_SIZE, KEEP = 64, 8
GOALS = {
    "online / cached epoch": (">=", 4.0),
    "cached DCD / fine-tune step": ("<=", 1.15),
    "peak RSS 4x / 1x cache": ("<=", 1.1),
}


def build_caches(teacher: Path, root: Path, groups: int, threads: int) -> tuple[Path, Path]:
    """The 1x cache (`groups` groups scored by the teacher) and the 4x cache (its shard four
    times: four times the rows to stream, without four times the teacher's work)."""
    fields = {
        "teacher": teacher,
        "out": root / "cache-1x",
        "group_size": GROUP_SIZE,
        "keep": KEEP,
        "rounds": 1,
        "max_groups": groups,
        "groups_per_shard": groups,
        "workers": 0,
        "threads": threads,
        "data.image_size": 64,
        "data.max_tokens": 24,
    }
    config = load_config(cache.CacheConfig, None, [f"{k}={v}" for k, v in fields.items()])
    summary = cache.run(config)
    log.info(
        "cache: %d groups, %d pairs in %.1f s",
        summary["groups"],
        summary["pairs"],
        summary["seconds"],
    )

    large = root / "cache-4x"
    large.mkdir()
    manifest = read_manifest(config.out)
    (first,) = manifest.shards
    copies = [first.model_copy(update={"name": shard_name(index)}) for index in range(4)]
    for entry in copies:
        shutil.copy(config.out / first.name, large / entry.name)
    write_manifest(large, manifest.model_copy(update={"shards": copies}))
    return config.out, large


def student_config(
    variant: str, cache_dir: Path, teacher: Path, out: Path, threads: int, *extra: str
) -> student.StudentConfig:
    overrides = [
        f"cache={cache_dir}",
        f"teacher={teacher}",
        f"out={out}",
        "epochs=1",
        f"candidates={GROUP_SIZE}",
        f"keep={KEEP}",
        "batch_queries=32",
        f"threads={threads}",
        "log_every=1",
        "evaluate=false",
        "separability_groups=0",
        *extra,
    ]
    return load_config(
        student.StudentConfig, REPO / "configs" / "variants" / f"{variant}.yaml", overrides
    )


def step_seconds(out: Path, pairs_per_step: int) -> float:
    """Median seconds per step (data wait included) from the per-step metrics."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(
        pairs_per_step / r["pairs_per_s"] for r in records if r["event"] == "step"
    )


def _peak_rss_epoch(config: dict) -> int:
    """In a fresh process: one student epoch; returns the process's peak RSS in KiB."""
    setup_logging("WARNING")
    student.run(student.StudentConfig.model_validate(config))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_rss(config: student.StudentConfig) -> int:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_peak_rss_epoch, (config.model_dump(mode="json"),))


def cache_bytes(cache_dir: Path) -> int:
    return sum(entry.bytes for entry in read_manifest(cache_dir).shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="teacher folder (default: random `shapes`)")
    parser.add_argument("--groups", type=int, default=4, help="groups of 64 in the 1x cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()
    setup_logging()
    root = args.out or Path(tempfile.mkdtemp(prefix="student_costs-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ratios = measure(args, root)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    for name, value in ratios.items():
        sign, goal = GOALS[name]
        met = value >= goal if sign == ">=" else value <= goal
        print(f"{name:28s} {value:6.2f}x   goal {sign} {goal}   {'met' if met else 'NOT met'}")


def measure(args: argparse.Namespace, root: Path) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    teacher = args.teacher or save_model(build_model("shapes", seed=0), root / "teacher")
    small, large = build_caches(teacher, root, args.groups, args.threads)

    # (1) and (2): three epochs over the 1x cache in this process
    seconds, steps = {}, {}
    for name, variant, extra in (
        ("finetune", "finetune", ()),
        ("cached", "dcd", ()),
        ("online", "dcd", ("online=true",)),
    ):
        config = student_config(variant, small, teacher, root / name, args.threads, *extra)
        start = time.perf_counter()
        summary = student.run(config)
        seconds[name] = summary["train_seconds"]
        steps[name] = step_seconds(root / name, config.batch_queries * config.keep)
        log.info(
            "%s: %d steps, epoch %.1f s (run %.1f s), median step %.0f ms",
            name,
            summary["steps"],
            seconds[name],
            time.perf_counter() - start,
            1000 * steps[name],
        )

    # (3): the same cached epoch over 1x and 4x, each in a fresh process
    rss = {}
    for name, cache_dir in (("1x", small), ("4x", large)):
        config = student_config("dcd", cache_dir, teacher, root / f"rss-{name}", args.threads)
        rss[name] = peak_rss(config)
        log.info(
            "peak RSS over the %s cache (%.1f MB of Parquet): %.0f MiB",
            name,
            cache_bytes(cache_dir) / 1e6,
            rss[name] / 1024,
        )

    return {
        "online / cached epoch": seconds["online"] / seconds["cached"],
        "cached DCD / fine-tune step": steps["cached"] / steps["finetune"],
        "peak RSS 4x / 1x cache": rss["4x"] / rss["1x"],
    }


if __name__ == "__main__":
    main()
