"""The main job: dataset -> teacher -> cache -> student variants -> evaluation -> report.

    dcd run                 # the default profile on the embedded shapes benchmark
    dcd run --quick         # a small profile (about 3 minutes), what CI runs
    dcd run --set profile=long   # students train 4 epochs on 4 cached rounds (~30 min a seed)
    dcd run --seeds 3       # every number as mean +- std over three seeds

Every stage's output folder is named by a hash of its config and inputs, so a rerun reuses
what is done and a changed config recomputes only what depends on it.
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import StrictModel, config_hash, load_config, save_resolved
from pipeline.data import DataConfig, dataset_spec, open_data
from pipeline.fsio import write_json
from pipeline.groups import make_groups
from pipeline.inspection import PRESETS, open_cache
from pipeline.models import load_model, teacher_fingerprint
from pipeline.scoring import PairScorer, pick_device
from pipeline.shards import read_manifest
from stages import cache, evaluate, finetune, student, sweep

log = logging.getLogger(__name__)

TABLE2 = ["finetune", "vanilla_kd", "wsl_kd", "student_uncertainty", "dcd"]
TABLE3 = ["vanilla_kd", "ds_ka", "ds_ka_hw", "ds_ka_sw", "dcd"]
FIG3 = [(16, 16), (32, 4), (32, 8), (64, 4), (64, 8), (64, 16)]


class Profile(StrictModel):
    """How much work each stage does; `quick` is the CI-sized one."""

    cache_rounds: int = Field(default=1, ge=1)
    cache_max_groups: int | None = None
    student_epochs: int = Field(default=1, ge=1)
    # a shortlist of the first N test images keeps the default run within its 15-minute budget
    # on 2 cores (13 students x 50,000 pairs would take 12 minutes alone); the report names it
    eval_max_images: int | None = 50
    variants: list[str] = Field(default_factory=lambda: sorted(set(TABLE2 + TABLE3)))
    fig3: list[tuple[int, int]] = Field(default_factory=lambda: list(FIG3))


PROFILES = {
    "default": Profile(),
    "quick": Profile(
        cache_rounds=1,
        cache_max_groups=6,
        student_epochs=1,
        eval_max_images=20,
        variants=["finetune", "vanilla_kd", "dcd"],
        fig3=[(32, 4), (64, 8)],
    ),
    # four epochs, each on its own cached round of groups (fresh negatives, as online training
    # would see them): about 30 minutes a seed on 2 cores, past the default's budget
    "long": Profile(cache_rounds=4, student_epochs=4),
}


class RunConfig(StrictModel):
    out: Path = Path("runs/main")
    profile: Literal["default", "quick", "long"] = "default"
    seeds: int = Field(default=1, ge=1)
    data: DataConfig = Field(default_factory=lambda: DataConfig(image_size=64, max_tokens=24))
    teacher: Path = Path("models/shapes-teacher")
    teacher_recipe: list[Path] = Field(
        default_factory=lambda: [
            Path("configs/shapes_stage1.yaml"),
            Path("configs/shapes_stage2.yaml"),
            Path("configs/teacher_shapes.yaml"),
        ]
    )
    cache_config: Path = Path("configs/cache_shapes.yaml")
    student_config: Path = Path("configs/student_shapes.yaml")
    variants_dir: Path = Path("configs/variants")
    workers: int = Field(default=2, ge=1)
    threads: int = Field(default=1, ge=1)


class Stages:
    """Numbered stage banners (the live display) and per-stage timings."""

    def __init__(self, total: int):
        self.total, self.index, self.timings = total, 0, {}

    def start(self, name: str) -> float:
        self.index += 1
        log.info("== stage %d/%d: %s ==", self.index, self.total, name)
        return time.perf_counter()

    def done(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 1)


def ensure_teacher(config: RunConfig) -> Path:
    """The shipped teacher, or one fine-tuned with the recipe (stage by stage) when absent."""
    if (config.teacher / "config.json").is_file():
        return config.teacher
    log.info("no teacher at %s: fine-tuning one with %s", config.teacher, config.teacher_recipe)
    for recipe in config.teacher_recipe:
        cfg = load_config(finetune.FinetuneConfig, recipe, [])
        if not (cfg.out / "model" / "config.json").is_file():
            finetune.run(cfg.model_copy(update={"resume": True}))
    return load_config(finetune.FinetuneConfig, config.teacher_recipe[-1], []).out / "model"


def teacher_reference(config: RunConfig, teacher: Path, profile: Profile) -> dict:
    """Test metrics of the teacher (cached by hash) and its separability on val groups."""
    eval_cfg = evaluate.EvaluateConfig(
        model=teacher, data=config.data, threads=2, max_images=profile.eval_max_images
    )
    out = config.out / f"teacher-eval-{config_hash(eval_cfg, _tree_hash(teacher))}"
    eval_cfg = eval_cfg.model_copy(update={"out": out})
    summary = _reuse_json(out / "metrics.json") or evaluate.run(eval_cfg)
    data = open_data(config.data, ("val",))
    groups = make_groups(data.split("val"), min(16, len(data.split("val").images)), 0, 0)[:4]
    scorer = PairScorer(load_model(teacher), data.images, data.captions, pick_device())
    import torch

    summary["separability"] = student.separability(scorer, torch.from_numpy(groups))
    return summary


def build_cache(config: RunConfig, teacher: Path, profile: Profile) -> Path:
    overrides = [
        f"teacher={teacher}",
        f"rounds={profile.cache_rounds}",
        f"workers={config.workers}",
        f"threads={config.threads}",
    ]
    if profile.cache_max_groups:
        overrides.append(f"max_groups={profile.cache_max_groups}")
    cfg = load_config(cache.CacheConfig, config.cache_config, overrides)
    cfg = cfg.model_copy(update={"data": config.data})
    out = config.out / f"cache-{config_hash(cfg, _tree_hash(teacher))}"
    cache.run(cfg.model_copy(update={"out": out}))
    return out


def student_configs(
    config: RunConfig, cache_dir: Path, teacher: Path, profile: Profile
) -> list[tuple[dict, student.StudentConfig]]:
    """(meta, config) for every variant and Fig. 3 point, for every seed."""
    plan: dict[str, dict] = {}
    for name in profile.variants:
        groups = [g for g, names in (("table2", TABLE2), ("table3", TABLE3)) if name in names]
        plan[name] = {"variant": name, "groups": groups, "set": []}
    for m1, k in profile.fig3:
        name = "dcd" if (m1, k) == (64, 8) and "dcd" in plan else f"m{m1}_k{k}"
        entry = plan.setdefault(
            name, {"variant": "dcd", "groups": [], "set": [f"candidates={m1}", f"keep={k}"]}
        )
        entry["groups"].append("fig3")
    common = [
        f"cache={cache_dir}",
        f"teacher={teacher}",
        f"epochs={profile.student_epochs}",
        f"threads={config.threads}",
    ]
    if profile.eval_max_images:
        common.append(f"eval_max_images={profile.eval_max_images}")
    configs = []
    for name, meta in plan.items():
        for seed in range(config.seeds):
            path = config.variants_dir / f"{meta['variant']}.yaml"
            cfg = load_config(
                student.StudentConfig,
                path,
                [*common, *meta["set"], f"seed={seed}", f"variant={meta['variant']}"],
            )
            cfg = cfg.model_copy(update={"data": config.data})
            digest = config_hash(cfg, read_manifest(cache_dir).model_dump_json())
            cfg = cfg.model_copy(
                update={"out": config.out / "students" / f"{name}-s{seed}-{digest}"}
            )
            candidates, keep = cfg.candidates, cfg.keep
            configs.append(
                ({"name": name, **meta, "seed": seed, "candidates": candidates, "keep": keep}, cfg)
            )
    return configs


def inspect_presets(cache_dir: Path, config: RunConfig) -> dict:
    from stages.inspect import _names

    captions, images = _names(cache_dir)
    con = open_cache(cache_dir, captions, images)
    return {name: preset(con).to_pylist() for name, preset in PRESETS.items()}


def run(config: RunConfig, command: str = "dcd run") -> dict:
    """The whole pipeline; returns where the report and artifacts are."""
    profile = PROFILES[config.profile]
    save_resolved(config, config.out)
    stages = Stages(6)

    started = stages.start("dataset")
    dataset_spec(config.data)
    stages.done("data", started)

    started = stages.start("teacher")
    teacher = ensure_teacher(config)
    teacher_summary = teacher_reference(config, teacher, profile)
    stages.done("teacher", started)

    started = stages.start("teacher knowledge cache")
    cache_dir = build_cache(config, teacher, profile)
    inspected = inspect_presets(cache_dir, config)
    stages.done("cache", started)

    started = stages.start("students")
    planned = student_configs(config, cache_dir, teacher, profile)
    summaries = sweep.train_all([cfg for _, cfg in planned], config.workers, config.threads)
    stages.done("students", started)

    started = stages.start("report")
    results = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "profile": config.profile,
        "seeds": list(range(config.seeds)),
        "dataset": config.data.dataset,
        "split": "test",
        "teacher": teacher_summary,
        "students": [{**meta, "summary": s} for (meta, _), s in zip(planned, summaries)],
        "inspect": inspected,
        "timings": stages.timings,
    }
    write_json(config.out / "results.json", results)
    from stages import report

    report_path = report.run(config.out)
    stages.done("report", started)
    write_json(config.out / "results.json", {**results, "timings": stages.timings})
    log.info("run: report %s, artifacts in %s, %s", report_path, config.out, stages.timings)
    return {"report": str(report_path), "out": str(config.out), "timings": stages.timings}


def _reuse_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _tree_hash(folder: Path) -> str:
    return teacher_fingerprint(folder)
