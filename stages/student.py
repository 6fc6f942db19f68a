"""The student stage: train any variant (DCD, its ablations, the baselines) from the cache.

    dcd student train configs/variants/dcd.yaml --set cache=runs/cache

The cache is streamed (row groups into a seeded shuffle buffer, memory bounded), round
`epoch mod R` each epoch. Each batch holds K queries; their first M + 1 cached candidates are
cut down to M' + 1 (teacher selection with knowledge adjustment, or random), the student scores
those pairs and `pipeline.losses` combines task and distillation terms as the variant's
switches say. `online: true` computes the teacher logits inside the loop instead of reading
them: same candidates, same losses, the reference for correctness and cost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from pipeline.candidates import CACHE_COLUMNS, DrawnBatch, cache_batches, choose, gather_pairs
from pipeline.config import StrictModel, save_resolved
from pipeline.data import DataConfig, open_data
from pipeline.fsio import write_json
from pipeline.groups import make_groups
from pipeline.losses import LossSwitches, distillation_losses
from pipeline.models import (
    load_model,
    make_student,
    parameter_count,
    save_model,
    teacher_fingerprint,
)
from pipeline.runtime import seed_everything, set_threads
from pipeline.scoring import PairScorer, pick_device
from pipeline.shards import CacheError, read_manifest
from pipeline.streaming import shuffled_batches
from pipeline.training import Schedule, Trainer

log = logging.getLogger(__name__)


class LossConfig(StrictModel):
    """The variant's switches; see `pipeline.losses.LossSwitches`."""

    alpha: float = Field(default=0.2, ge=0, le=1)
    distill: bool = True
    weight_hard: bool = False
    weight_soft: bool = False
    uncertainty_from: Literal["teacher", "student"] = "teacher"
    wsl: bool = False
    task_loss: Literal["ce", "bce"] = "ce"


class StudentConfig(StrictModel):
    variant: str = "dcd"
    cache: Path = Path("runs/cache")
    teacher: Path = Path("models/shapes-teacher")
    data: DataConfig = Field(default_factory=DataConfig)
    student_layers: list[int] | None = None  # default: every other teacher layer
    out: Path = Path("runs/student")
    candidates: int = Field(default=64, ge=2)  # M + 1, the first ones in draw order
    keep: int = Field(default=8, ge=2)  # M' + 1 that the student sees
    selection: Literal["teacher", "random"] = "teacher"  # DS (teacher's top) or random
    adjust: bool = True  # KA: positive first with the top teacher score
    loss: LossConfig = Field(default_factory=LossConfig)
    online: bool = False
    batch_queries: int = Field(default=32, ge=1)  # K
    epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    shuffle_buffer: int = Field(default=4096, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)
    device: str = "auto"
    log_every: int = Field(default=20, gt=0)
    separability_groups: int = Field(default=4, ge=0)  # val groups tracked for Fig. 4
    # Fig. 4 is also measured before the first step and every N steps (0: at epoch ends only)
    separability_every: int = Field(default=25, ge=0)
    evaluate: bool = True  # full-matrix test evaluation at the end
    eval_max_images: int | None = Field(default=None, ge=1)  # a shortlist; the report names it
    resume: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> StudentConfig:
        if self.keep > self.candidates:
            raise ValueError(f"keep ({self.keep}) must not exceed candidates ({self.candidates})")
        LossSwitches(**self.loss.model_dump())  # raises on an impossible combination
        return self


def check_cache(config: StudentConfig, data_fingerprint: str, tokenizer_fingerprint: str) -> dict:
    """The cache manifest, after checking it matches the data, tokenizer and M + 1."""
    manifest = read_manifest(config.cache)
    found = {
        "dataset": data_fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "teacher": teacher_fingerprint(config.teacher),
    }
    for name, value in found.items():
        if manifest.fingerprints[name] != value:
            raise CacheError(
                f"{config.cache}: the cache was built from another {name} "
                f"({manifest.fingerprints[name]}) than the one given ({value}); point "
                f"`{'data' if name != 'teacher' else 'teacher'}` at what made it, or rebuild the "
                "cache with `dcd teacher cache`"
            )
    if config.candidates > manifest.group_size:
        raise CacheError(
            f"candidates={config.candidates} (M + 1) but {config.cache} holds "
            f"{manifest.group_size} per query; build a cache with group_size >= {config.candidates}"
        )
    return manifest.model_dump()


class StudentLoss:
    """Selection + student forward + losses for one batch; the teacher runs here when online."""

    def __init__(self, config: StudentConfig, student: PairScorer, teacher: PairScorer | None):
        self.config, self.student, self.teacher = config, student, teacher
        self.switches = LossSwitches(**config.loss.model_dump())

    def teacher_logits(self, drawn: DrawnBatch) -> torch.Tensor:
        if self.teacher is None:
            return drawn.teacher_logits
        with torch.no_grad():
            flat = self.teacher.logits(drawn.image_ids.flatten(), drawn.caption_ids.flatten())
        return flat.view(drawn.image_ids.shape).cpu()  # (K, M + 1)

    def __call__(self, drawn: DrawnBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        columns, teacher = choose(self.teacher_logits(drawn), cfg.keep, cfg.selection, cfg.adjust)
        image_ids, caption_ids = gather_pairs(drawn, columns)  # (K, M' + 1) each
        student = self.student.logits(image_ids.flatten(), caption_ids.flatten())
        student = student.view(image_ids.shape)  # (K, M' + 1), column 0 the positive
        if not torch.isfinite(student).all():
            # diverged weights: a non-finite total makes the trainer stop with a TrainingError
            # naming the step; distillation_losses would raise a bare ValueError instead
            return {"total": student.new_full((), float("nan"))}
        uses_teacher = self.switches.needs_teacher
        return distillation_losses(student, teacher if uses_teacher else None, self.switches)


@torch.no_grad()
def separability(scorer: PairScorer, groups: torch.Tensor) -> dict[str, float]:
    """Student's mean score of the positive and of its 3 highest negatives over val groups
    (both directions), the paper's Fig. 4."""
    positives, negatives = [], []
    scorer.model.eval()
    for group in groups:
        logits = scorer.group_logits(group).cpu()  # (G, G)
        for matrix in (logits, logits.T):
            diagonal = matrix.diagonal()
            off = matrix.masked_fill(torch.eye(len(matrix), dtype=torch.bool), float("-inf"))
            positives.append(diagonal)
            negatives.append(off.topk(min(3, len(matrix) - 1), dim=1).values.flatten())
    scorer.model.train()
    return {
        "val_positive": torch.cat(positives).mean().item(),
        "val_top3_negative": torch.cat(negatives).mean().item(),
    }


def run(config: StudentConfig) -> dict:
    """Train the student variant in `config.out`; returns a summary (and the test metrics)."""
    set_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out)
    save_resolved(config, out)
    data = open_data(config.data, ("train", "val"))
    manifest = check_cache(config, data.split("train").fingerprint(), data.tokenizer_fingerprint)

    # student from the teacher's layers; the teacher itself only when online
    device = pick_device(config.device)
    teacher_model = load_model(config.teacher)
    student = PairScorer(
        make_student(teacher_model, config.student_layers), data.images, data.captions, device
    )
    teacher = (
        PairScorer(teacher_model, data.images, data.captions, device) if config.online else None
    )
    loss = StudentLoss(config, student, teacher)

    rows_per_round = sum(s["rows"] for s in manifest["shards"]) // manifest["rounds"]
    schedule = Schedule(
        config.epochs,
        -(-rows_per_round // config.batch_queries),
        config.lr,
        config.warmup_steps,
        config.weight_decay,
        config.log_every,
    )
    trainer = Trainer(student.model, schedule, out, config.seed)
    if config.resume:
        trainer.resume()

    def epoch_batches(epoch: int):
        reader = lambda: shuffled_batches(  # noqa: E731
            config.cache,
            seed=config.seed * 1000 + epoch,
            buffer_rows=config.shuffle_buffer,
            batch_rows=config.batch_queries,
            columns=CACHE_COLUMNS,
            rounds=[epoch % manifest["rounds"]],
        )
        return cache_batches(reader, config.candidates)

    val_groups = torch.from_numpy(
        make_groups(data.split("val"), min(16, len(data.split("val").images)), config.seed, 0)[
            : config.separability_groups
        ]
    )
    measure = (lambda: separability(student, val_groups)) if len(val_groups) else None
    start = time.perf_counter()
    trainer.fit(
        epoch_batches,
        loss,
        config.batch_queries * config.keep,
        on_epoch_end=lambda epoch: measure() if measure else {},
        probe=measure if config.separability_every else None,
        probe_every=config.separability_every,
    )
    seconds = time.perf_counter() - start
    save_model(student.model.cpu(), out / "model")
    return _finish(config, out, trainer, student, seconds)


def _finish(
    config: StudentConfig, out: Path, trainer: Trainer, student: PairScorer, seconds: float
) -> dict:
    steps = [r for r in trainer.state.history if r.get("event") == "step"]
    summary = {
        "variant": config.variant,
        "seed": config.seed,
        "model": str(out / "model"),
        "parameters": parameter_count(student.model),
        "steps": trainer.state.step,
        "train_seconds": round(seconds, 1),
        "pairs_per_s": round(sum(r["pairs_per_s"] for r in steps) / len(steps), 1)
        if steps
        else None,
        "data_wait": round(sum(r["data_wait"] for r in steps) / len(steps), 3) if steps else None,
        "separability": [r for r in trainer.state.history if r.get("event") in ("epoch", "probe")],
    }
    if config.evaluate:
        from stages import evaluate

        eval_config = evaluate.EvaluateConfig(
            model=out / "model",
            data=config.data,
            out=out / "eval",
            threads=config.threads or 2,
            max_images=config.eval_max_images,
        )
        summary["test"] = evaluate.run(eval_config)
    write_json(out / "summary.json", summary)
    log.info(
        "student %s: %d steps in %.0f s%s",
        config.variant,
        summary["steps"],
        seconds,
        f", test RSUM {summary['test']['metrics']['rsum']:.1f}" if "test" in summary else "",
    )
    return summary
