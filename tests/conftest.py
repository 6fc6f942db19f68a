"""Shared fixtures. Data fixtures generate tiny files in tmp_path; nothing binary is checked in.

Karpathy fixtures:
- `make_karpathy(variant, splits=..., captions_per_image=...)` writes a split JSON plus real
  image files and returns a `KarpathyFiles` (paths and the rows written, for editing);
- `flickr_files` / `coco_files`: the two layouts with default sizes;
- `write_manifest(datasets)`: a data_manifest.yaml in tmp_path for those files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

# Image ids and caption ids deliberately differ from row positions, so a reader that used
# positions where the file gives ids would fail the tests.
IMGID_BASE = 1000
SENTID_BASE = 50_000


@dataclass
class KarpathyFiles:
    json_path: Path
    image_root: Path
    document: dict  # what was written; edit it and call rewrite() for bad-input tests

    @property
    def rows(self) -> list[dict]:
        return self.document["images"]

    def rewrite(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.document))

    def manifest_entry(self, **overrides) -> dict:
        """A data_manifest.yaml entry whose split counts match the rows written."""
        splits: dict[str, int] = {}
        for row in self.rows:
            splits[row["split"]] = splits.get(row["split"], 0) + 1
        entry = {
            "kind": "karpathy",
            "json_path": str(self.json_path),
            "image_root": str(self.image_root),
            "splits": splits,
            "captions_per_image": 5,
        }
        return {**entry, **overrides}

    def image_file(self, row: int) -> Path:
        item = self.rows[row]
        folder = self.image_root / item["filepath"] if "filepath" in item else self.image_root
        return folder / item["filename"]


def karpathy_rows(
    variant: str, splits: dict[str, int], captions_per_image: int, image_suffix: str = ".jpg"
) -> list[dict]:
    """Rows in file order: splits in the order given, `captions_per_image` captions each.

    flickr: filename only ("<id>.jpg"); coco: filepath train2014/val2014 and COCO file names
    (train and restval images live in train2014, val and test in val2014, as in the real file).
    """
    rows, sentid = [], SENTID_BASE
    for split, count in splits.items():
        for _ in range(count):
            imgid = IMGID_BASE + len(rows)
            sentences = [
                {
                    "raw": f"a picture number {imgid} caption {k}.",
                    "sentid": sentid + k,
                    "imgid": imgid,
                    "tokens": ["a", "picture"],
                }
                for k in range(captions_per_image)
            ]
            row = {
                "split": split,
                "imgid": imgid,
                "sentences": sentences,
                "sentids": [s["sentid"] for s in sentences],
            }
            if variant == "coco":
                folder = "train2014" if split in ("train", "restval") else "val2014"
                row.update(
                    filepath=folder,
                    filename=f"COCO_{folder}_{imgid:012d}{image_suffix}",
                    cocoid=imgid,
                )
            elif variant == "flickr":
                row["filename"] = f"{imgid}{image_suffix}"
            else:
                raise ValueError(f"variant must be flickr or coco, got {variant!r}")
            rows.append(row)
            sentid += captions_per_image
    return rows


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> None:
    """A small real image; the format follows the suffix (JPEG for .jpg, PNG for .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def make_karpathy(tmp_path: Path) -> Callable[..., KarpathyFiles]:
    def make(
        variant: str = "flickr",
        splits: dict[str, int] | None = None,
        captions_per_image: int = 5,
        folder: str | None = None,
        image_suffix: str = ".jpg",
    ) -> KarpathyFiles:
        splits = splits or {"train": 3, "val": 1, "test": 2}
        base = tmp_path / (folder or variant)
        dataset_name = {"flickr": "flickr30k", "coco": "coco"}[variant]
        image_root = base / ("flickr30k-images" if variant == "flickr" else "images")
        files = KarpathyFiles(
            json_path=base / f"dataset_{dataset_name}.json",
            image_root=image_root,
            document={
                "images": karpathy_rows(variant, splits, captions_per_image, image_suffix),
                "dataset": dataset_name,
            },
        )
        files.rewrite()
        for row in range(len(files.rows)):
            write_image(files.image_file(row), seed=row)
        return files

    return make


@pytest.fixture
def flickr_files(make_karpathy) -> KarpathyFiles:
    return make_karpathy("flickr", {"train": 3, "val": 1, "test": 2})


@pytest.fixture
def coco_files(make_karpathy) -> KarpathyFiles:
    return make_karpathy("coco", {"train": 2, "restval": 2, "val": 1, "test": 1})


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[[dict], Path]:
    """Write `{"datasets": datasets}` as tmp_path/data_manifest.yaml and return its path."""

    def write(datasets: dict, **top_level) -> Path:
        path = tmp_path / "data_manifest.yaml"
        path.write_text(yaml.safe_dump({"datasets": datasets, **top_level}, sort_keys=False))
        return path

    return write


# --- the shapes benchmark and a tiny model, shared by the stage tests -------------------------

TINY_SHAPES = {"train": 64, "val": 16, "test": 16}


@dataclass
class TinySetup:
    """A small generated shapes dataset, a manifest naming it, and a saved tiny model."""

    root: Path
    manifest: Path
    model_dir: Path

    def data_overrides(self) -> list[str]:
        """`--set` overrides that point a stage config at this dataset."""
        return [f"data.manifest={self.manifest}", "data.image_size=32", "data.max_tokens=24"]

    def data_config(self):
        from pipeline.data import DataConfig

        return DataConfig(manifest=self.manifest, image_size=32, max_tokens=24)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """Session-wide: shapes at 32x32 (64/16/16 images) and a 2-layer `tiny` preset model."""
    import torch

    from pipeline.models import build_model, save_model
    from pipeline.shapes import ShapesSpec, write_shapes

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    json_path = write_shapes(ShapesSpec(image_size=32, **TINY_SHAPES), root / "shapes")
    manifest = root / "data_manifest.yaml"
    entry = {
        "kind": "generated",
        "json_path": str(json_path),
        "image_root": str(json_path.parent / "images"),
        "splits": TINY_SHAPES,
        "captions_per_image": 5,
    }
    manifest.write_text(yaml.safe_dump({"datasets": {"shapes": entry}}))
    model_dir = save_model(build_model("tiny", seed=0), root / "tiny-model")
    return TinySetup(root=root, manifest=manifest, model_dir=model_dir)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Torch on one thread per test module: CI has 2 cores and Ray tests start workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_CACHE = {"group_size": 16, "keep": 4, "rounds": 2}  # 64 train images: 4 groups a round


@pytest.fixture(scope="session")
def tiny_cache(tiny: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A perturbed copy of the tiny model (so its logits differ) and its knowledge cache
    (G = 16, K = 4, 2 rounds), built once per session: {"teacher": dir, "cache": dir}."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import load_model, save_model
    from stages import cache

    model = load_model(tiny.model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    root = tmp_path_factory.mktemp("tiny-cache")
    teacher = save_model(model, root / "teacher")
    fields = {"teacher": teacher, "out": root / "cache", "workers": 0, "threads": 1, **TINY_CACHE}
    overrides = tiny.data_overrides() + [f"{key}={value}" for key, value in fields.items()]
    cache.run(load_config(cache.CacheConfig, None, overrides))
    return {"teacher": teacher, "cache": root / "cache"}
