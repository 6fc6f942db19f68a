"""Image loading and preprocessing.

Real data (Flickr30K, COCO) goes through transformers' `ViltImageProcessor`: shorter side 384,
longer side at most 640, both multiples of 32, mean/std 0.5, and a pixel mask for the padding.
The shapes benchmark uses a small fixed size with the same normalisation, decoded once into
memory because it is tiny (2,300 images at 64x64 are 28 MB as uint8).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """An image file that cannot be read; the message names it."""


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise ImageError(
            f"image file missing: {path} (run `dcd data check` for a full report)"
        ) from error
    except (UnidentifiedImageError, OSError) as error:
        raise ImageError(f"cannot decode image {path}: {error}") from error


class FixedSizeImages:
    """All images resized to `size` x `size` and held in memory as uint8 (N, 3, S, S)."""

    def __init__(self, paths: dict[int, Path], size: int, threads: int = 4):
        self.size = size
        self.index = {image_id: row for row, image_id in enumerate(paths)}
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(self._load, paths.values()))
        self.pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _load(self, path: Path) -> np.ndarray:
        image = _open_rgb(path)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(image, dtype=np.uint8)

    def batch(self, image_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, S, S) float in [-1, 1] and pixel_mask (B, S, S) of ones."""
        rows = torch.tensor([self.index[i] for i in image_ids], dtype=torch.long)
        pixels = self.pixels[rows].float().div_(127.5).sub_(1.0)
        mask = torch.ones(len(image_ids), self.size, self.size, dtype=torch.long)
        return pixels, mask


class ViltImages:
    """Images read from disk on demand and preprocessed the way ViLT was trained."""

    def __init__(self, paths: dict[int, Path], shorter: int = 384, longer: int = 640):
        from transformers import ViltImageProcessor

        self.paths = paths
        self.processor = ViltImageProcessor(
            size={"shortest_edge": shorter},
            size_divisor=32,
            do_pad=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        self.longer = longer

    def batch(self, image_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, H, W) padded to the batch maximum, pixel_mask (B, H, W)."""
        images = [_open_rgb(self.paths[i]) for i in image_ids]
        encoded = self.processor(images, return_tensors="pt")
        return encoded["pixel_values"], encoded["pixel_mask"]


def image_store(paths: dict[int, Path], fixed_size: int | None) -> FixedSizeImages | ViltImages:
    """In-memory fixed-size images when `fixed_size` is set, else ViLT preprocessing from disk."""
    return FixedSizeImages(paths, fixed_size) if fixed_size else ViltImages(paths)
