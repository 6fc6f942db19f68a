"""The Karpathy split reader: both file layouts, ids, splits, restval folding, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import IMGID_BASE, SENTID_BASE

from pipeline.karpathy import DataError, ImageEntry, load_karpathy


def test_flickr_layout_loads_ids_splits_and_captions(flickr_files):
    dataset = load_karpathy(flickr_files.json_path, flickr_files.image_root)

    assert dataset.name == "flickr30k"  # from the file's "dataset" field
    assert dataset.image_ids() == [IMGID_BASE + i for i in range(6)]
    assert [entry.split for entry in dataset.images] == ["train"] * 3 + ["val"] + ["test"] * 2
    assert dataset.images[0] == ImageEntry(
        image_id=1000,
        relpath="1000.jpg",
        split="train",
        caption_ids=tuple(range(SENTID_BASE, SENTID_BASE + 5)),
    )
    assert dataset.caption_ids() == list(range(SENTID_BASE, SENTID_BASE + 30))
    assert dataset.captions[SENTID_BASE + 7] == "a picture number 1001 caption 2."
    assert dataset.caption_image[SENTID_BASE + 7] == 1001
    assert dataset.image_path(1005) == flickr_files.image_root / "1005.jpg"
    assert dataset.image_path(1005).is_file()


def test_coco_layout_joins_filepath_and_keeps_restval(coco_files):
    dataset = load_karpathy(coco_files.json_path, coco_files.image_root, name="coco-test")

    assert dataset.name == "coco-test"  # an explicit name wins over the file's field
    assert dataset.split_counts() == {"train": 2, "val": 1, "test": 1, "restval": 2}
    assert dataset.images[2].relpath == "train2014/COCO_train2014_000000001002.jpg"
    assert dataset.images[4].relpath == "val2014/COCO_val2014_000000001004.jpg"
    for image_id in dataset.image_ids():
        assert dataset.image_path(image_id).is_file()


def test_restval_as_train_folds_restval_into_train(coco_files):
    dataset = load_karpathy(coco_files.json_path, coco_files.image_root, restval_as_train=True)

    assert dataset.split_counts() == {"train": 4, "val": 1, "test": 1}
    assert [entry.image_id for entry in dataset.split("train").images] == [1000, 1001, 1002, 1003]
    assert dataset.split("restval").images == []


def test_split_keeps_only_those_images_and_their_captions(coco_files):
    dataset = load_karpathy(coco_files.json_path, coco_files.image_root)

    subset = dataset.split("val", "test")
    assert subset.image_ids() == [1004, 1005]
    assert subset.caption_ids() == list(range(SENTID_BASE + 20, SENTID_BASE + 30))
    assert set(subset.caption_image.values()) == {1004, 1005}
    assert subset.image_path(1005) == dataset.image_path(1005)
    with pytest.raises(KeyError, match="image id 1000"):
        subset.image_path(1000)
    with pytest.raises(ValueError, match="train, val, test, restval"):
        dataset.split("validation")


def test_ids_fall_back_to_positions_without_imgid_and_sentid(make_karpathy):
    files = make_karpathy("flickr", {"train": 2, "test": 1}, captions_per_image=2)
    for row in files.rows:
        del row["imgid"]
        for sentence in row["sentences"]:
            del sentence["sentid"]
    files.rewrite()

    dataset = load_karpathy(files.json_path, files.image_root)
    assert dataset.image_ids() == [0, 1, 2]
    assert dataset.caption_ids() == [0, 1, 2, 3, 4, 5]
    assert dataset.images[2].caption_ids == (4, 5)
    assert dataset.caption_image[3] == 1


def test_blank_captions_are_kept_for_the_checker(flickr_files):
    flickr_files.rows[1]["sentences"][0]["raw"] = "   "
    flickr_files.rows[2]["sentences"][4]["raw"] = ""
    flickr_files.rewrite()

    dataset = load_karpathy(flickr_files.json_path, flickr_files.image_root)
    assert dataset.captions[SENTID_BASE + 5] == "   "
    assert dataset.captions[SENTID_BASE + 14] == ""
    assert len(dataset.captions) == 30


def test_fingerprint_is_stable_and_tracks_content_and_options(make_karpathy):
    files = make_karpathy("coco")
    first = load_karpathy(files.json_path, files.image_root)
    again = load_karpathy(files.json_path, files.image_root)
    folded = load_karpathy(files.json_path, files.image_root, restval_as_train=True)

    assert first.fingerprint() == again.fingerprint()
    assert len(first.fingerprint()) == 64
    assert folded.fingerprint() != first.fingerprint()
    assert first.split("test").fingerprint() != first.fingerprint()

    # The same bytes elsewhere (another machine, another DCD_DATA_ROOT) fingerprint the same.
    copy = make_karpathy("coco", folder="elsewhere")
    assert copy.json_path.read_bytes() == files.json_path.read_bytes()
    assert load_karpathy(copy.json_path, copy.image_root).fingerprint() == first.fingerprint()

    files.rows[0]["sentences"][0]["raw"] = "changed"
    files.rewrite()
    assert load_karpathy(files.json_path, files.image_root).fingerprint() != first.fingerprint()


# Bad input: each case names the file and the row/field, and says what is expected.


def test_malformed_json_names_file_line_and_column(flickr_files):
    text = json.dumps(flickr_files.document, indent=1)
    flickr_files.json_path.write_text(text[: len(text) // 2])  # a truncated download

    with pytest.raises(DataError) as caught:
        load_karpathy(flickr_files.json_path, flickr_files.image_root)
    message = str(caught.value)
    assert str(flickr_files.json_path) in message
    assert "not valid JSON at line" in message and "column" in message
    assert "download it again" in message


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read the dataset file"):
        load_karpathy(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("document", [{"annotations": []}, [1, 2], {"images": {"a": 1}}])
def test_missing_images_list(tmp_path, document):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(document))

    with pytest.raises(DataError, match='no top-level "images" list') as caught:
        load_karpathy(path, tmp_path)
    assert str(path) in str(caught.value)


def test_unknown_split_names_row_value_and_allowed(flickr_files):
    flickr_files.rows[4]["split"] = "validation"
    flickr_files.rewrite()

    with pytest.raises(DataError) as caught:
        load_karpathy(flickr_files.json_path, flickr_files.image_root)
    message = str(caught.value)
    assert str(flickr_files.json_path) in message
    assert "images[4].split: unknown value 'validation'" in message
    assert "allowed: train, val, test, restval" in message


def test_missing_filename(flickr_files):
    del flickr_files.rows[2]["filename"]
    flickr_files.rewrite()

    with pytest.raises(DataError, match=r"images\[2\]\.filename: missing"):
        load_karpathy(flickr_files.json_path, flickr_files.image_root)


def test_duplicate_image_id_names_both_rows(flickr_files):
    flickr_files.rows[3]["imgid"] = flickr_files.rows[1]["imgid"]
    flickr_files.rewrite()

    with pytest.raises(DataError) as caught:
        load_karpathy(flickr_files.json_path, flickr_files.image_root)
    message = str(caught.value)
    assert str(flickr_files.json_path) in message
    assert "images[3].imgid: duplicate image id 1001 (first at images[1])" in message


def test_duplicate_caption_id_names_row_and_sentence(coco_files):
    coco_files.rows[5]["sentences"][2]["sentid"] = coco_files.rows[0]["sentences"][0]["sentid"]
    coco_files.rewrite()

    with pytest.raises(DataError) as caught:
        load_karpathy(coco_files.json_path, coco_files.image_root)
    message = str(caught.value)
    assert f"images[5].sentences[2].sentid: duplicate caption id {SENTID_BASE}" in message
    assert "(first in images[0])" in message


def test_every_bad_row_is_collected_in_one_error(flickr_files):
    flickr_files.rows[0]["split"] = "dev"
    del flickr_files.rows[2]["filename"]
    flickr_files.rows[3]["imgid"] = "x7"
    flickr_files.rows[5]["sentences"][1] = {"tokens": ["no", "raw"]}
    flickr_files.rewrite()

    with pytest.raises(DataError) as caught:
        load_karpathy(flickr_files.json_path, flickr_files.image_root)
    errors = caught.value.errors
    assert len(errors) == 4
    assert [e.split(": ")[0] for e in errors] == [
        "images[0].split",
        "images[2].filename",
        "images[3].imgid",
        "images[5].sentences[1].raw",
    ]
    assert "4 problems" in str(caught.value)
