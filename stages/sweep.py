"""Many student variants and seeds from one cache, in parallel as Ray tasks.

    dcd student sweep configs/sweep_shapes.yaml

Each run is a variant config plus the sweep's shared overrides and a seed, trained in its own
folder `out/<name>-s<seed>`. A run that already has a summary.json is reused. The results table
(CSV and Markdown) has R@K, RSUM, training time and pairs/s per run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import ray
from pydantic import Field
from tqdm import tqdm

from pipeline.config import StrictModel, load_config, save_resolved
from pipeline.fsio import write_text
from pipeline.parallel import init_ray
from stages import student

log = logging.getLogger(__name__)

METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")


class SweepRun(StrictModel):
    config: Path  # a student variant YAML
    name: str | None = None  # default: the config file's stem
    set: list[str] = Field(default_factory=list)  # extra overrides for this run


class SweepConfig(StrictModel):
    runs: list[SweepRun] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: list[str] = Field(default_factory=list)  # overrides applied to every run
    out: Path = Path("runs/sweep")
    workers: int = Field(default=2, ge=1)  # runs trained at the same time
    threads: int = Field(default=1, ge=1)  # torch threads per run
    ray_address: str | None = None


def run_configs(config: SweepConfig, base_dir: Path) -> list[student.StudentConfig]:
    """Every (run, seed) as a validated student config; relative paths resolve from base_dir."""
    configs = []
    for item in config.runs:
        path = item.config if item.config.is_absolute() else base_dir / item.config
        name = item.name or path.stem
        for seed in config.seeds:
            overrides = [
                *config.set,
                *item.set,
                f"seed={seed}",
                f"threads={config.threads}",
                f"out={config.out / f'{name}-s{seed}'}",
                f"variant={name}",
            ]
            configs.append(load_config(student.StudentConfig, path, overrides))
    return configs


def _train(config: student.StudentConfig) -> dict:
    from pipeline.runtime import setup_logging

    setup_logging()
    return student.run(config)


def train_all(
    configs: list[student.StudentConfig], workers: int, threads: int, ray_address: str | None = None
) -> list[dict]:
    """Summaries of every student config, training only those without a summary.json;
    `workers` runs at a time as Ray tasks of `threads` CPUs each."""
    summaries = {str(c.out): _load_summary(c) for c in configs}
    todo = [c for c in configs if summaries[str(c.out)] is None]
    log.info("students: %d runs, %d already done", len(configs), len(configs) - len(todo))
    bar = tqdm(total=len(todo), desc="students", unit="run", dynamic_ncols=True, disable=not todo)
    if todo and workers == 1 and not ray_address:
        for c in todo:
            summaries[str(c.out)] = _finished(c, student.run(c), bar)
    elif todo:
        init_ray(ray_address, num_cpus=max(workers * threads, 1))
        task = ray.remote(num_cpus=threads)(_train)
        pending = {task.remote(c): c for c in todo}
        while pending:  # in order of completion, so the bar and the log move as runs finish
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(ready)
            summaries[str(c.out)] = _finished(c, ray.get(ready), bar)
    bar.close()
    return [summaries[str(c.out)] for c in configs]


def _finished(config: student.StudentConfig, summary: dict, bar: tqdm) -> dict:
    bar.update(1)
    rsum = summary.get("test", {}).get("metrics", {}).get("rsum")
    log.info(
        "student %s: RSUM %s, trained in %.0f s",
        Path(config.out).name,
        "n/a" if rsum is None else f"{rsum:.1f}",
        summary["train_seconds"],
    )
    return summary


def run(config: SweepConfig, base_dir: Path = Path(".")) -> dict:
    """Train every run (reusing finished ones) and write results.csv / results.md."""
    save_resolved(config, config.out)
    configs = run_configs(config, base_dir)
    summaries = train_all(configs, config.workers, config.threads, config.ray_address)
    rows = [_row(c, s) for c, s in zip(configs, summaries)]
    write_text(config.out / "results.csv", to_csv(rows))
    write_text(config.out / "results.md", to_markdown(rows))
    return {"runs": len(rows), "results": str(config.out / "results.md"), "rows": rows}


def _load_summary(config: student.StudentConfig) -> dict | None:
    """A finished run's summary, if that run was made with this very config."""
    path, saved = Path(config.out) / "summary.json", Path(config.out) / "config.yaml"
    if not path.is_file():
        return None
    done = load_config(student.StudentConfig, saved) if saved.is_file() else None
    if done is None or done.model_copy(update={"resume": False}) != config.model_copy(
        update={"resume": False}
    ):
        log.warning("%s: finished with another config; training it again", config.out)
        return None
    return json.loads(path.read_text())


def _row(config: student.StudentConfig, summary: dict) -> dict:
    metrics = summary.get("test", {}).get("metrics", {})
    row = {"variant": config.variant, "seed": config.seed}
    row.update({name: metrics.get(name) for name in METRICS})
    row.update(
        train_seconds=summary["train_seconds"],
        pairs_per_s=summary["pairs_per_s"],
        out=str(config.out),
    )
    return row


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
