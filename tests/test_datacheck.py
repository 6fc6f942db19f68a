"""The dataset checker: every problem of a broken dataset lands in one report."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.datacheck import check_dataset, check_image
from pipeline.manifest import load_manifest


def _spec(files, write_manifest, **overrides):
    path = write_manifest({"mini": files.manifest_entry(**overrides)})
    return load_manifest(path).dataset("mini")


def test_clean_dataset_passes(coco_files, write_manifest):
    report = check_dataset(_spec(coco_files, write_manifest))

    assert report.ok, report.format()
    assert report.problems == []
    assert report.counts == {"images": 6, "captions": 30, "images_readable": 6}
    assert report.split_counts == {"train": 2, "val": 1, "test": 1, "restval": 2}
    assert "OK: no problems" in report.format()


def test_every_kind_of_problem_in_one_report(make_karpathy, write_manifest):
    files = make_karpathy(
        "coco", {"train": 4, "restval": 2, "val": 1, "test": 2}, image_suffix=".png"
    )
    files.image_file(1).unlink()  # missing image
    files.image_file(2).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # corrupt PNG
    files.rows[3]["sentences"][2]["raw"] = " \t "  # whitespace-only caption
    files.rows[6]["sentences"][0]["raw"] = ""  # empty caption
    del files.rows[7]["sentences"][4]  # an image with 4 captions
    files.rewrite()
    # The manifest expects other counts than the file has (train 4 -> 5, test 2 -> 1).
    spec = _spec(files, write_manifest, splits={"train": 5, "restval": 2, "val": 1, "test": 1})

    report = check_dataset(spec, workers=2)
    name = files.json_path.name
    found = {(p.kind, p.where) for p in report.problems}
    assert found == {
        ("missing_image", str(files.image_file(1))),
        ("corrupt_image", str(files.image_file(2))),
        ("empty_caption", f"{name} images[3].sentences[2]"),
        ("empty_caption", f"{name} images[6].sentences[0]"),
        ("few_captions", f"{name} images[7]"),
        ("split_count", f"{name} split 'train'"),
        ("split_count", f"{name} split 'test'"),
    }
    assert not report.ok
    assert report.counts["images_readable"] == 7

    by_where = {p.where: p.message for p in report.problems}
    assert by_where[f"{name} split 'train'"] == "expected 5 images (manifest), found 4"
    assert "whitespace only (' \\t ')" in by_where[f"{name} images[3].sentences[2]"]
    assert "has 4 captions; the manifest asks for at least 5" in by_where[f"{name} images[7]"]
    assert by_where[str(files.image_file(1))] == "images[1] (image id 1001): file not found"

    text = report.format()
    for heading in (
        "split_count (2):",
        "empty_caption (2):",
        "few_captions (1):",
        "missing_image (1):",
        "corrupt_image (1):",
    ):
        assert heading in text
    assert text.index("split_count (2):") < text.index("missing_image (1):")
    assert "FAILED: 7 problems" in text


def test_more_captions_than_nominal_pass_the_minimum(coco_files, write_manifest):
    coco_files.rows[0]["sentences"].append({"raw": "a sixth caption", "sentid": 99_999})
    coco_files.rewrite()

    report = check_dataset(_spec(coco_files, write_manifest, min_captions_per_image=5))
    assert report.ok, report.format()
    assert report.counts["captions"] == 31


def test_load_errors_are_all_reported(flickr_files, write_manifest):
    spec = _spec(flickr_files, write_manifest)
    flickr_files.rows[0]["split"] = "dev"
    flickr_files.rows[4]["split"] = "holdout"
    flickr_files.rewrite()

    report = check_dataset(spec)
    assert [p.kind for p in report.problems] == ["load_error", "load_error"]
    assert "images[0].split: unknown value 'dev'" in report.problems[0].message
    assert "images[4].split: unknown value 'holdout'" in report.problems[1].message
    assert "nothing loaded" in report.format()


def test_missing_json_says_how_to_get_it(flickr_files, write_manifest):
    spec = _spec(flickr_files, write_manifest, source="fetch it from the lab share")
    flickr_files.json_path.unlink()

    report = check_dataset(spec)
    (problem,) = report.problems
    assert problem.kind == "load_error"
    assert "dataset file not found; fetch it from the lab share" in problem.message


def test_missing_image_folder_is_one_problem(flickr_files, write_manifest):
    spec = _spec(flickr_files, write_manifest, image_root=str(flickr_files.image_root) + "-typo")

    report = check_dataset(spec)
    (problem,) = report.problems
    assert problem.kind == "missing_image"
    assert "image folder not found, so none of the 6 images" in problem.message


def test_without_verify_only_existence_is_checked(make_karpathy, write_manifest):
    files = make_karpathy("flickr", image_suffix=".png")
    files.image_file(0).write_bytes(b"not an image")
    files.image_file(5).unlink()

    report = check_dataset(_spec(files, write_manifest), verify_images=False)
    assert [(p.kind, p.where) for p in report.problems] == [
        ("missing_image", str(files.image_file(5)))
    ]
    assert report.counts["images_found"] == 5


def test_format_caps_each_kind(make_karpathy, write_manifest):
    files = make_karpathy("flickr", {"test": 25}, captions_per_image=5)
    for row in files.rows:
        row["sentences"][0]["raw"] = ""
    files.rewrite()

    text = check_dataset(_spec(files, write_manifest)).format(max_per_kind=20)
    assert "empty_caption (25):" in text
    assert text.count("is empty") == 20
    assert "  ... and 5 more" in text


def test_truncated_jpeg_is_corrupt_though_verify_passes(tmp_path: Path):
    path = tmp_path / "cut.jpg"
    Image.effect_noise((64, 64), 40).convert("RGB").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-200])  # an interrupted download: scan data cut short
    with Image.open(path) as image:
        image.verify()  # PIL's verify() alone does not notice

    kind, detail = check_image(path)
    assert kind == "corrupt_image"
    assert "image file is truncated" in detail


def test_good_images_of_other_modes_pass(tmp_path: Path):
    for mode in ("L", "P", "RGBA", "I;16"):
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.new(mode, (5, 5)).save(path)
        assert check_image(path) is None, mode


def test_mode_without_rgb_conversion_is_reported(tmp_path: Path, monkeypatch):
    # Pillow converts every mode it writes to RGB, so simulate a decoder that yields one it cannot.
    path = tmp_path / "odd.png"
    Image.new("L", (3, 3)).save(path)

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    kind, detail = check_image(path)
    assert kind == "not_rgb"
    assert "mode L does not convert to RGB" in detail
