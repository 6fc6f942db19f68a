"""Process-level setup shared by the stages: logging, threads, seeds, device."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "transformers", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_threads(threads: int | None) -> int:
    """Limit torch's intra-op threads (None: leave the default); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
