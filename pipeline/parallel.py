"""Ray plumbing: start or join a cluster, and scoring actors that load a model once.

A local Ray starts by default; `address` (or the RAY_ADDRESS environment variable) joins an
existing cluster. Each actor holds one model and one copy of the data inputs, takes one GPU when
the cluster has GPUs, and limits torch to `threads` CPU threads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.data import DataConfig, open_data
from pipeline.models import load_model
from pipeline.runtime import set_threads
from pipeline.scoring import PairScorer, pick_device

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process: to `address`, RAY_ADDRESS, or a new local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # the working tree travels to workers through the installed packages, not runtime_env
    kwargs = dict(address=address) if address else dict(num_cpus=num_cpus, include_dashboard=False)
    ray.init(log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    log.info("ray: %s", "joined " + address if address else f"local, {num_cpus or 'all'} CPUs")


class Scorer:
    """One model and the inputs of one dataset split (as a Ray actor: `ScorerActor`)."""

    def __init__(
        self,
        model_dir: str,
        data: DataConfig,
        splits: tuple[str, ...],
        threads: int,
        device: str = "auto",
    ):
        set_threads(threads)
        loaded = open_data(data, splits)
        self.scorer = PairScorer(
            load_model(Path(model_dir)), loaded.images, loaded.captions, pick_device(device)
        )

    def matrix(
        self, image_ids: list[int], caption_ids: list[int], pairs_per_batch: int
    ) -> np.ndarray:
        """Scores (len(image_ids), len(caption_ids)) float32."""
        return self.scorer.matrix(image_ids, caption_ids, pairs_per_batch).numpy()

    @torch.inference_mode()
    def group_matrices(self, groups: np.ndarray, pairs_per_batch: int | None = None) -> np.ndarray:
        """Logits (n, G, G) of groups (n, G, 2) of (image_id, caption_id), scored in forward
        passes of `pairs_per_batch` pairs (None: one pass per group).

        Entry [g, i, j] scores image i with caption j of group g.
        """
        groups = torch.from_numpy(groups)
        return np.stack(
            [self.scorer.group_logits(group, pairs_per_batch).cpu().numpy() for group in groups]
        )


def scorer_actors(
    count: int, model_dir: Path, data: DataConfig, splits: tuple[str, ...], threads: int
) -> list:
    """`count` Ray actors, each a `Scorer`; one GPU each when the cluster has GPUs."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= count else 0
    actor = ray.remote(num_cpus=threads, num_gpus=gpus)(Scorer)
    return [actor.remote(str(model_dir), data, splits, threads) for _ in range(count)]
