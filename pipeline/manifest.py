"""The data manifest: which datasets dcd knows by name, where they live, what counts they have.

    python -c "from pipeline.manifest import load_manifest; print(load_manifest().dataset('coco'))"

`data_manifest.yaml` sits at the repository root. Relative paths resolve against the manifest's
folder; when the environment variable DCD_DATA_ROOT is set, it replaces the leading `data/` of
every relative path, so the same manifest serves a checkout and a shared data disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.karpathy import SPLITS, DataError, RetrievalDataset, load_karpathy

MANIFEST_NAME = "data_manifest.yaml"
DATA_ROOT_ENV = "DCD_DATA_ROOT"
_DATA_DIR = "data"  # the leading path part that DCD_DATA_ROOT replaces
# karpathy: a split file the user provides; generated: one that a `dcd data` command writes.
DatasetKind = Literal["karpathy", "generated"]


class ManifestError(DataError):
    """A manifest that cannot be read or validated, or a dataset name it does not list."""


class _DatasetEntry(BaseModel):
    """One dataset as written in the YAML (paths still unresolved)."""

    model_config = ConfigDict(extra="forbid")

    kind: DatasetKind
    json_path: Path
    image_root: Path
    splits: dict[str, int] = Field(description="expected number of images per split")
    captions_per_image: int = Field(gt=0)
    min_captions_per_image: int | None = Field(default=None, gt=0)
    source: str | None = Field(default=None, description="where to get the data; shown on errors")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; allowed: {', '.join(SPLITS)}")
        negative = {name: count for name, count in splits.items() if count < 0}
        if negative:
            raise ValueError(f"split counts must be >= 0, got {negative}")
        return splits


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: dict[str, _DatasetEntry]


class DatasetSpec(BaseModel):
    """A dataset with its paths resolved: what `dcd data check NAME` verifies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: DatasetKind
    json_path: Path
    image_root: Path
    splits: dict[str, int]
    captions_per_image: int
    min_captions_per_image: int
    source: str | None = None
    manifest_path: Path | None = None

    def load(self, restval_as_train: bool = False) -> RetrievalDataset:
        if not self.json_path.is_file():
            raise DataError.in_file(
                self.json_path, [f"dataset file not found; {self.fetch_hint()}"]
            )
        return load_karpathy(
            self.json_path, self.image_root, name=self.name, restval_as_train=restval_as_train
        )

    def fetch_hint(self) -> str:
        """One sentence on how to get the files or point dcd at them."""
        default = {
            "generated": "generate it with its `dcd data` command",
            "karpathy": "download the Karpathy split JSON and the images",
        }[self.kind]
        how = self.source or default
        where = f"its paths in {self.manifest_path}" if self.manifest_path else "its paths"
        return (
            f"{how}; or fix {where}, or point DCD_DATA_ROOT at the folder that stands in for data/"
        )


class DataManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    datasets: dict[str, DatasetSpec]

    def dataset(self, name: str) -> DatasetSpec:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "(none)"
            raise ManifestError(
                f"{self.path}: no dataset named '{name}'; known datasets: {known}. "
                f"Add an entry under `datasets:` to use another one."
            ) from None


def load_manifest(path: Path | None = None) -> DataManifest:
    """Read and validate the manifest; `path=None` finds the repository's data_manifest.yaml."""
    path = Path(path) if path is not None else find_manifest()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ManifestError(
            f"{path}: cannot read the data manifest ({exc.strerror or exc})"
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None

    try:
        parsed = _ManifestFile.model_validate(document if document is not None else {})
    except ValidationError as exc:
        raise ManifestError(_validation_message(path, exc)) from None

    data_root = os.environ.get(DATA_ROOT_ENV) or None
    datasets = {
        name: _resolve(name, entry, path, data_root) for name, entry in parsed.datasets.items()
    }
    return DataManifest(path=path, datasets=datasets)


def find_manifest() -> Path:
    """data_manifest.yaml in the current folder or the nearest parent, else beside the package."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / MANIFEST_NAME
        if candidate.is_file():
            return candidate
    beside_package = Path(__file__).resolve().parents[1] / MANIFEST_NAME
    if beside_package.is_file():
        return beside_package
    raise ManifestError(
        f"no {MANIFEST_NAME} in {here} or its parents, nor at {beside_package}; "
        "run from the dcd checkout or pass the manifest path"
    )


def resolve_data_path(path: Path, manifest_dir: Path, data_root: str | None) -> Path:
    """Absolute paths stay; `data/...` moves under `data_root` when given; the rest joins the
    manifest's folder."""
    path = path.expanduser()
    if path.is_absolute():
        return path
    if data_root and path.parts and path.parts[0] == _DATA_DIR:
        return Path(data_root).expanduser().resolve().joinpath(*path.parts[1:])
    return manifest_dir / path


def _resolve(name: str, entry: _DatasetEntry, manifest: Path, data_root: str | None) -> DatasetSpec:
    manifest_dir = manifest.resolve().parent
    return DatasetSpec(
        name=name,
        kind=entry.kind,
        json_path=resolve_data_path(entry.json_path, manifest_dir, data_root),
        image_root=resolve_data_path(entry.image_root, manifest_dir, data_root),
        splits=entry.splits,
        captions_per_image=entry.captions_per_image,
        min_captions_per_image=entry.min_captions_per_image or entry.captions_per_image,
        source=entry.source,
        manifest_path=manifest,
    )


def _validation_message(path: Path, exc: ValidationError) -> str:
    """One line per problem, each naming the key path (datasets.coco.splits) in the YAML."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            parent = _DatasetEntry if len(error["loc"]) == 3 else _ManifestFile
            allowed = ", ".join(parent.model_fields)
            lines.append(f"{where}: unknown key; allowed keys here: {allowed}")
        else:
            lines.append(f"{where}: {error['msg']}")
    return f"{path}: invalid data manifest:\n  " + "\n  ".join(lines)
