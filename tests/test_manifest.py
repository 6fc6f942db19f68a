"""data_manifest.yaml: the repository's own file, validation messages, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.karpathy import DataError
from pipeline.manifest import ManifestError, find_manifest, load_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _entry(**overrides) -> dict:
    entry = {
        "kind": "karpathy",
        "json_path": "data/mini/dataset.json",
        "image_root": "data/mini/images",
        "splits": {"train": 3, "test": 2},
        "captions_per_image": 5,
    }
    return {**entry, **overrides}


def test_repository_manifest_names_the_three_datasets():
    manifest = load_manifest(REPO_ROOT / "data_manifest.yaml")

    assert sorted(manifest.datasets) == ["coco", "flickr30k", "shapes"]
    coco = manifest.dataset("coco")
    assert coco.kind == "karpathy"
    assert coco.splits == {"train": 82783, "restval": 30504, "val": 5000, "test": 5000}
    assert coco.min_captions_per_image == 5
    assert coco.image_root == REPO_ROOT / "data" / "coco"
    assert manifest.dataset("flickr30k").splits == {"train": 29000, "val": 1014, "test": 1000}
    shapes = manifest.dataset("shapes")
    assert (shapes.kind, shapes.captions_per_image) == ("generated", 5)
    assert shapes.json_path == REPO_ROOT / "data" / "shapes" / "dataset.json"


def test_relative_paths_resolve_against_the_manifest_folder(write_manifest, tmp_path, monkeypatch):
    monkeypatch.delenv("DCD_DATA_ROOT", raising=False)
    monkeypatch.chdir(REPO_ROOT)  # not the manifest's folder
    absolute = tmp_path / "elsewhere" / "images"
    path = write_manifest({"mini": _entry(image_root=str(absolute))})

    spec = load_manifest(path).dataset("mini")
    assert spec.json_path == tmp_path / "data" / "mini" / "dataset.json"
    assert spec.image_root == absolute
    assert spec.min_captions_per_image == 5  # defaults to captions_per_image


def test_data_root_env_replaces_the_data_folder(write_manifest, tmp_path, monkeypatch):
    path = write_manifest({"mini": _entry(image_root="pictures/mini")})
    monkeypatch.setenv("DCD_DATA_ROOT", str(tmp_path / "disk"))

    spec = load_manifest(path).dataset("mini")
    assert spec.json_path == tmp_path / "disk" / "mini" / "dataset.json"
    assert spec.image_root == tmp_path / "pictures" / "mini"  # not under data/: unchanged


def test_data_root_env_reaches_the_loader(make_karpathy, tmp_path, monkeypatch):
    files = make_karpathy("flickr", folder="disk/flickr30k")
    manifest = tmp_path / "repo" / "data_manifest.yaml"
    manifest.parent.mkdir()
    manifest.write_text(
        "datasets:\n  flickr30k:\n    kind: karpathy\n"
        "    json_path: data/flickr30k/dataset_flickr30k.json\n"
        "    image_root: data/flickr30k/flickr30k-images\n"
        "    splits: {train: 3, val: 1, test: 2}\n    captions_per_image: 5\n"
    )
    monkeypatch.setenv("DCD_DATA_ROOT", str(tmp_path / "disk"))

    dataset = load_manifest(manifest).dataset("flickr30k").load()
    assert dataset.json_path == files.json_path
    assert dataset.image_path(1000) == files.image_file(0)


def test_unknown_keys_are_rejected_with_the_allowed_ones(write_manifest):
    path = write_manifest({"mini": _entry(image_dir="x")}, version=2)

    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message
    assert "datasets.mini.image_dir: unknown key" in message
    assert "allowed keys here: kind, json_path, image_root, splits" in message
    assert "version: unknown key; allowed keys here: datasets" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"splits": {"train": 3, "dev": 1}}, "unknown split(s) ['dev']"),
        ({"kind": "tsv"}, "datasets.mini.kind"),
        ({"captions_per_image": 0}, "datasets.mini.captions_per_image"),
    ],
)
def test_bad_values_name_the_key(write_manifest, overrides, expected):
    with pytest.raises(ManifestError, match="invalid data manifest") as caught:
        load_manifest(write_manifest({"mini": _entry(**overrides)}))
    assert expected in str(caught.value)


def test_unknown_dataset_name_lists_known_ones(write_manifest):
    manifest = load_manifest(write_manifest({"mini": _entry(), "coco": _entry()}))

    with pytest.raises(
        ManifestError, match="no dataset named 'flickr'; known datasets: coco, mini"
    ):
        manifest.dataset("flickr")


def test_missing_dataset_file_says_how_to_get_it(write_manifest):
    path = write_manifest({"shapes": _entry(kind="generated", source="run `dcd data shapes`")})

    with pytest.raises(DataError, match="dataset file not found; run `dcd data"):
        load_manifest(path).dataset("shapes").load()


def test_default_path_is_found_from_the_current_folder_upwards(
    write_manifest, tmp_path, monkeypatch
):
    path = write_manifest({"mini": _entry()})
    nested = tmp_path / "runs" / "today"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)

    assert find_manifest() == path
    assert load_manifest().path == path


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "data_manifest.yaml"
    path.write_text("datasets: [unclosed\n")

    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(path)
