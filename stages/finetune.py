"""Teacher fine-tuning with ViLT's retrieval recipe.

    dcd teacher finetune configs/shapes_stage1.yaml   # stage 1 of the shipped teacher
    dcd teacher finetune CONFIG --resume             # go on from the last epoch checkpoint

Per query image: softmax cross-entropy over its own caption and N = G - 1 captions of other
random images; per caption, over its image and the same N other images. Both directions come
from one G x G matrix of an in-batch group (`pipeline.groups`): G distinct random images with one
caption each, so every negative is a random caption or image, as in ViLT's recipe, at a quarter of
the cost of drawing separate negatives per direction.
AdamW with linear warmup then linear decay; a checkpoint each epoch; `--resume` continues from
the last one. The final model is written with `save_pretrained`. `pairing: neighbours` builds
each group from pairs of images with similar captions instead (harder negatives: on shapes, the
minimal-pair twins that random groups almost never hold).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from pipeline.config import StrictModel, save_resolved
from pipeline.data import DataConfig, open_data
from pipeline.groups import make_groups, neighbour_groups
from pipeline.models import ModelConfig, build_from_config, parameter_count, save_model
from pipeline.runtime import seed_everything, set_threads
from pipeline.scoring import PairScorer, pick_device
from pipeline.training import Schedule, Trainer

log = logging.getLogger(__name__)


class FinetuneConfig(StrictModel):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    out: Path = Path("runs/teacher")
    epochs: int = Field(default=10, gt=0)
    group_size: int = Field(default=16, ge=2)  # G images per step: 1 positive + N = G - 1 negatives
    directions: list[Literal["tr", "ir"]] = Field(
        default_factory=lambda: ["tr", "ir"], min_length=1
    )
    # random: G random images (ViLT's recipe); neighbours: G / 2 pairs of caption-similar images,
    # so most queries meet a near-duplicate negative (pipeline.groups.neighbour_groups)
    pairing: Literal["random", "neighbours"] = "random"
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)
    device: str = "auto"
    log_every: int = Field(default=20, gt=0)
    resume: bool = False


def retrieval_loss(
    scorer: PairScorer, group: torch.Tensor, directions: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy with the diagonal as positives: rows (tr) and columns (ir)."""
    logits = scorer.group_logits(group)
    target = torch.arange(len(group), device=logits.device)
    terms = {
        "tr": lambda: torch.nn.functional.cross_entropy(logits, target),
        "ir": lambda: torch.nn.functional.cross_entropy(logits.T, target),
    }
    parts = {f"task_{d}": terms[d]() for d in directions}
    return {"total": sum(parts.values()) / len(parts), **parts}


def run(config: FinetuneConfig) -> dict:
    """Fine-tune, save the model to `config.out/model`, and return a summary."""
    set_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out)
    save_resolved(config, out)
    data = open_data(config.data)
    train = data.split("train")
    model = build_from_config(config.model)
    scorer = PairScorer(model, data.images, data.captions, pick_device(config.device))

    # schedule and trainer; resume picks up the last finished epoch
    grouping = {"random": make_groups, "neighbours": neighbour_groups}[config.pairing]
    per_epoch = len(grouping(train, config.group_size, config.seed, 0))
    schedule = Schedule(
        config.epochs,
        per_epoch,
        config.lr,
        config.warmup_steps,
        config.weight_decay,
        config.log_every,
    )
    trainer = Trainer(model, schedule, out, config.seed)
    if config.resume:
        trainer.resume()
    directions = tuple(config.directions)

    start = time.perf_counter()
    trainer.fit(
        lambda epoch: iter(
            torch.from_numpy(grouping(train, config.group_size, config.seed, epoch))
        ),
        lambda group: retrieval_loss(scorer, group, directions),
        config.group_size**2,
    )
    seconds = time.perf_counter() - start
    save_model(model.cpu(), out / "model")
    steps = [r for r in trainer.state.history if r.get("event") == "step"]
    summary = {
        "model": str(out / "model"),
        "layers": model.config.num_hidden_layers,
        "parameters": parameter_count(model),
        "steps": trainer.state.step,
        "seconds": round(seconds, 1),
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    log.info(
        "finetune: %d steps in %.0f s, final loss %s, saved %s",
        summary["steps"],
        seconds,
        summary["final_loss"],
        summary["model"],
    )
    return summary
