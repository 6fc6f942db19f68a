"""Scoring (image, caption) pairs with a fusion model, reusing each image's visual embeddings.

ViLT embeds an image (patch projection, position and [CLS] tokens) before fusion. That part
depends on the image only, so it runs once per distinct image in a batch and is shared by every
caption paired with it; the fused transformer then runs once per pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import ViltForImageAndTextRetrieval

from pipeline.images import FixedSizeImages, ViltImages
from pipeline.text import TokenizedCaptions


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embed_images(
    model: ViltForImageAndTextRetrieval, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual embeddings (B, 1 + P, D) and their mask (B, 1 + P), in canonical patch order.

    transformers' `visual_embed` draws a random patch order (and samples patches beyond
    `max_image_length`); sorting by patch position makes the result independent of the RNG
    whenever no patches are dropped, so the same image always gives the same embeddings.
    """
    embeddings = model.vilt.embeddings
    x, x_mask, (patch_index, _) = embeddings.visual_embed(
        pixel_values, pixel_mask, max_image_length=model.config.max_image_length
    )
    width = int(patch_index[..., 1].max()) + 1
    order = (patch_index[..., 0] * width + patch_index[..., 1]).argsort(
        dim=1, stable=True
    )  # (B, P)
    order = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)  # keep [CLS] first
    x = torch.gather(x, 1, order[..., None].expand_as(x))
    x_mask = torch.gather(x_mask, 1, order)
    return x, x_mask


def fused_logits(
    model: ViltForImageAndTextRetrieval,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeds: torch.Tensor,
    image_mask: torch.Tensor,
) -> torch.Tensor:
    """Retrieval logits (P,) for P pairs: text rows (P, L) with image embeddings (P, 1 + Q, D)."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_embeds=image_embeds,
        pixel_mask=image_mask,
    )
    return output.logits[:, 0]


@dataclass
class PairScorer:
    """Scores pairs of ids: images from `images`, captions from `captions`."""

    model: ViltForImageAndTextRetrieval
    images: FixedSizeImages | ViltImages
    captions: TokenizedCaptions
    device: torch.device

    def __post_init__(self) -> None:
        self.model.to(self.device)

    def logits(self, image_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """Logits (P,) for P pairs (image_ids[p], caption_ids[p]); differentiable in train mode."""
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        embeds, embed_mask = self.image_embeddings(unique.tolist())
        return self._fuse(embeds, embed_mask, inverse, caption_ids)

    def image_embeddings(self, image_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual embeddings (I, 1 + Q, D) and mask (I, 1 + Q) of distinct images, on the device."""
        pixels, mask = self.images.batch(image_ids)
        with autocast(self.device):
            return embed_images(self.model, pixels.to(self.device), mask.to(self.device))

    def _fuse(
        self,
        embeds: torch.Tensor,
        embed_mask: torch.Tensor,
        inverse: torch.Tensor,
        caption_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (P,): caption_ids[p] with the image embedding at row inverse[p]."""
        input_ids, attention = self.captions.batch(caption_ids)
        inverse = inverse.to(self.device)
        with autocast(self.device):
            logits = fused_logits(
                self.model,
                input_ids.to(self.device),
                attention.to(self.device),
                embeds[inverse],
                embed_mask[inverse],
            )
        return logits.float()

    def group_logits(self, group: torch.Tensor, pairs_per_batch: int | None = None) -> torch.Tensor:
        """Logits (G, G) of a group (G, 2) of (image_id, caption_id); [i, j]: image i, caption j.

        `pairs_per_batch` splits the G x G pairs into forward passes of that many (the images
        are still embedded once). On a CPU, 256-pair passes score a G = 64 group 2.5-3x faster
        than one 4,096-pair pass (whose activations overflow the caches; measured 2026-12-03).
        """
        size = len(group)
        image_ids = group[:, 0].repeat_interleave(size)  # (G * G,) row-major
        caption_ids = group[:, 1].repeat(size)
        if pairs_per_batch is None or pairs_per_batch >= size * size:
            return self.logits(image_ids, caption_ids).view(size, size)
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        embeds, embed_mask = self.image_embeddings(unique.tolist())
        chunks = [
            self._fuse(embeds, embed_mask, inverse[start : start + pairs_per_batch], captions)
            for start, captions in zip(
                range(0, size * size, pairs_per_batch), _chunks(caption_ids, pairs_per_batch)
            )
        ]
        return torch.cat(chunks).view(size, size)

    @torch.inference_mode()
    def matrix(
        self, image_ids: list[int], caption_ids: list[int], pairs_per_batch: int = 1024
    ) -> torch.Tensor:
        """Scores (I, C) of every image against every caption, on the CPU.

        Batches never mix images, so a row's scores do not depend on which other images are
        scored in the same call (a split over workers gives identical numbers).
        """
        rows = [self._row(image_id, caption_ids, pairs_per_batch) for image_id in image_ids]
        return torch.stack(rows) if rows else torch.empty(0, len(caption_ids))

    def _row(self, image_id: int, caption_ids: list[int], pairs_per_batch: int) -> torch.Tensor:
        # the image is embedded once and every caption chunk reuses it (a COCO 5K row is 25
        # chunks of 1,024; from disk, ViltImages would otherwise decode the file 25 times)
        embeds, embed_mask = self.image_embeddings([image_id])
        captions = torch.tensor(caption_ids, dtype=torch.long)
        chunks = [
            self._fuse(embeds, embed_mask, torch.zeros(len(chunk), dtype=torch.long), chunk).cpu()
            for chunk in _chunks(captions, pairs_per_batch)
        ]
        return torch.cat(chunks)


def _chunks(values: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
