"""Full-matrix retrieval evaluation: every test image against every test caption.

    dcd evaluate models/shapes-teacher --out runs/eval-teacher

Writes `metrics.json` (TR/IR R@1/5/10, RSUM, median and mean ranks, parameter count, pairs/s,
per-pair latency; for COCO-sized splits also the 1K five-fold mean) and prints a short table.
Scoring can be spread over Ray workers, split by images; batches never mix images, so the
numbers are identical to a single process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
from pydantic import Field

from pipeline.config import ConfigError, StrictModel, save_resolved
from pipeline.data import DataConfig, dataset_spec
from pipeline.fsio import write_json
from pipeline.models import load_model, parameter_count
from pipeline.parallel import Scorer, init_ray, scorer_actors
from pipeline.recall import five_fold_metrics, retrieval_metrics
from pipeline.shapes import minimal_pair_accuracy, read_twins

log = logging.getLogger(__name__)


class EvaluateConfig(StrictModel):
    model: Path = Path("models/shapes-teacher")
    data: DataConfig = Field(default_factory=DataConfig)
    split: str = "test"
    out: Path = Path("runs/evaluate")
    five_fold: bool | None = None  # COCO 1K protocol; None: on when the split has 5,000 images
    max_images: int | None = Field(default=None, gt=0)  # first N images only (the report says so)
    workers: int = Field(default=1, ge=1)  # 1: score in this process; more: Ray actors
    threads: int = Field(default=2, ge=1)  # torch threads per worker
    ray_address: str | None = None
    pairs_per_batch: int = Field(default=256, gt=0)  # 256: fastest on CPU (pipeline.scoring)
    device: str = "auto"


def _split_ids(config: EvaluateConfig) -> tuple[list[int], list[int], np.ndarray]:
    dataset = dataset_spec(config.data).load(config.data.restval_as_train).split(config.split)
    image_ids = dataset.image_ids()[: config.max_images]
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    caption_ids = [c for c in dataset.caption_ids() if dataset.caption_image[c] in row_of]
    caption_image = np.array([row_of[dataset.caption_image[c]] for c in caption_ids])
    return image_ids, caption_ids, caption_image


def score_matrix(
    config: EvaluateConfig, image_ids: list[int], caption_ids: list[int]
) -> np.ndarray:
    """Scores (I, C); with several workers, contiguous image blocks go to Ray actors."""
    splits = (config.split,)
    if config.workers == 1 and not config.ray_address:
        scorer = Scorer(str(config.model), config.data, splits, config.threads, config.device)
        return scorer.matrix(image_ids, caption_ids, config.pairs_per_batch)
    init_ray(config.ray_address, num_cpus=None)
    actors = scorer_actors(config.workers, config.model, config.data, splits, config.threads)
    blocks = np.array_split(np.array(image_ids), config.workers)
    futures = [
        actor.matrix.remote(block.tolist(), caption_ids, config.pairs_per_batch)
        for actor, block in zip(actors, blocks)
    ]
    return np.concatenate(ray.get(futures), axis=0)


def run(config: EvaluateConfig) -> dict:
    """Evaluate `config.model` on `config.split`; returns (and writes) the metrics summary."""
    out = Path(config.out)
    save_resolved(config, out)
    image_ids, caption_ids, caption_image = _split_ids(config)
    if config.five_fold and len(image_ids) % 5:
        raise ConfigError(
            f"five_fold: the {len(image_ids)} images of split {config.split!r} do not split into "
            "5 equal folds; set five_fold=false or max_images to a multiple of 5"
        )
    log.info(
        "evaluate: %d images x %d captions = %d pairs",
        len(image_ids),
        len(caption_ids),
        len(image_ids) * len(caption_ids),
    )

    start = time.perf_counter()
    scores = score_matrix(config, image_ids, caption_ids)
    seconds = time.perf_counter() - start
    np.save(out / "scores.npy", scores)

    pairs = scores.size
    model = load_model(config.model)
    summary = {
        "model": str(config.model),
        "dataset": config.data.dataset,
        "split": config.split,
        "shortlist": f"first {config.max_images} images" if config.max_images else None,
        "metrics": retrieval_metrics(scores, caption_image),
        "parameters": parameter_count(model),
        "layers": model.config.num_hidden_layers,
        "pairs": pairs,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(pairs / seconds, 1),
        "latency_ms_per_pair": round(1000 * seconds / pairs, 4),
        "workers": config.workers,
    }
    if config.five_fold or (config.five_fold is None and len(image_ids) == 5000):
        summary["five_fold"] = five_fold_metrics(scores, caption_image)
    twins = read_twins(dataset_spec(config.data).json_path)
    if twins:  # shapes: how often the model tells each image from its minimal-pair twin
        summary["minimal_pairs"] = minimal_pair_accuracy(scores, image_ids, caption_image, twins)
    write_json(out / "metrics.json", summary)
    log.info(
        "evaluate: %d pairs in %.1f s (%.0f pairs/s), RSUM %.1f",
        pairs,
        seconds,
        summary["pairs_per_s"],
        summary["metrics"]["rsum"],
    )
    return summary


def format_table(summary: dict) -> str:
    """A short fixed-width table of the recall metrics."""
    m = summary["metrics"]
    rows = [
        f"{'':6}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>7}{'meanr':>8}",
        f"{'TR':6}{m['tr_r1']:8.1f}{m['tr_r5']:8.1f}{m['tr_r10']:8.1f}{m['tr_medr']:7.0f}"
        f"{m['tr_meanr']:8.1f}",
        f"{'IR':6}{m['ir_r1']:8.1f}{m['ir_r5']:8.1f}{m['ir_r10']:8.1f}{m['ir_medr']:7.0f}"
        f"{m['ir_meanr']:8.1f}",
        f"RSUM {m['rsum']:.1f}   {summary['pairs']} pairs, {summary['pairs_per_s']:.0f} pairs/s, "
        f"{summary['parameters'] / 1e6:.2f}M parameters",
    ]
    if summary.get("shortlist"):
        rows.append(
            f"shortlist: {summary['shortlist']} of split {summary['split']} (not the full protocol)"
        )
    if summary.get("minimal_pairs"):
        shares = "  ".join(
            f"{change} {v['tr']:.2f}/{v['ir']:.2f}"
            for change, v in summary["minimal_pairs"].items()
        )
        rows.append(f"minimal pairs, share own > twin (TR/IR; 0.50 is chance): {shares}")
    if "five_fold" in summary:
        f = summary["five_fold"]
        rows.append(
            f"1K five-fold: TR R@1 {f['tr_r1']:.1f}  IR R@1 {f['ir_r1']:.1f}  RSUM {f['rsum']:.1f}"
        )
    return "\n".join(rows)
