"""The shapes benchmark generator: determinism, Karpathy layout, minimal pairs, vocabulary."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.shapes import (
    CHANGES,
    INVERSE,
    Scene,
    ShapeObject,
    ShapesSpec,
    build_entries,
    captions_for,
    minimal_pair_accuracy,
    read_twins,
    render,
    write_shapes,
)

SMALL = {"train": 40, "val": 10, "test": 10, "image_size": 16}


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    """A few hundred images, enough for every kind of twin to occur many times."""
    return [
        entry
        for entry, _ in build_entries(ShapesSpec(train=300, val=20, test=20, image_size=8, seed=3))
    ]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = write_shapes(ShapesSpec(**SMALL, seed=7), tmp_path / "a").parent
    second = write_shapes(ShapesSpec(**SMALL, seed=7), tmp_path / "b").parent
    files = folder_bytes(first)
    assert len(files) == 1 + 60  # dataset.json and one PNG per image
    assert files == folder_bytes(second)


def test_different_seed_gives_different_data(tmp_path):
    first = write_shapes(ShapesSpec(**SMALL, seed=1), tmp_path / "a")
    second = write_shapes(ShapesSpec(**SMALL, seed=2), tmp_path / "b")
    scenes = [
        [row["scene"] for row in json.loads(p.read_text())["images"]] for p in (first, second)
    ]
    assert sum(a != b for a, b in zip(*scenes)) > len(scenes[0]) // 2
    assert folder_bytes(first.parent / "images") != folder_bytes(second.parent / "images")


def test_layout_is_karpathy_json_with_requested_split_counts(tmp_path):
    json_path = write_shapes(ShapesSpec(train=6, val=4, test=2, image_size=16), tmp_path / "s")
    document = json.loads(json_path.read_text())
    rows = document["images"]
    assert collections.Counter(row["split"] for row in rows) == {"train": 6, "val": 4, "test": 2}
    assert [row["split"] for row in rows] == ["train"] * 6 + ["val"] * 4 + ["test"] * 2
    sentids = [s["sentid"] for row in rows for s in row["sentences"]]
    assert len(set(sentids)) == len(sentids) == 5 * len(rows)
    for row in rows:
        assert (json_path.parent / "images" / row["filename"]).is_file()
        assert row["sentids"] == [s["sentid"] for s in row["sentences"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_every_image_has_five_non_empty_captions(entries):
    for entry in entries:
        texts = [s["raw"] for s in entry["sentences"]]
        assert len(texts) == 5, entry["imgid"]
        assert all(text.strip() for text in texts), entry["imgid"]


def test_png_matches_the_requested_size_and_is_not_blank(tmp_path):
    from PIL import Image

    json_path = write_shapes(ShapesSpec(train=2, val=2, test=2, image_size=24), tmp_path / "s")
    with Image.open(json_path.parent / "images" / "000000.png") as image:
        assert image.size == (24, 24) and image.mode == "RGB"
        colours = {colour for _, colour in image.getcolors()}
    assert len(colours) > 1  # at least one shape drawn on the white background


def scene_of(entry: dict) -> Scene:
    scene = entry["scene"]
    return Scene(tuple(ShapeObject(**obj) for obj in scene["objects"]), scene["relation"])


def attribute_diff(a: Scene, b: Scene) -> list[tuple[int, str]]:
    """(object index, field) of every difference between two scenes with aligned objects."""
    assert len(a.objects) == len(b.objects)
    return [
        (i, name)
        for i, (x, y) in enumerate(zip(a.objects, b.objects))
        for name in ("shape", "colour", "size", "x", "y")
        if getattr(x, name) != getattr(y, name)
    ]


def test_every_image_has_a_twin_in_the_same_split(entries):
    by_id = {entry["imgid"]: entry for entry in entries}
    for entry in entries:
        twin = by_id[entry["twin"]]
        assert twin["imgid"] != entry["imgid"]
        assert twin["twin"] == entry["imgid"]
        assert twin["split"] == entry["split"]
        assert twin["twin_change"] == entry["twin_change"] in CHANGES


def test_twins_differ_in_exactly_the_named_attribute(entries):
    by_id = {entry["imgid"]: entry for entry in entries}
    seen = collections.Counter()
    for entry in entries:
        base, twin = scene_of(entry), scene_of(by_id[entry["twin"]])
        change, diff = entry["twin_change"], attribute_diff(base, twin)
        seen[change] += 1
        if change == "colour_swap":
            assert diff == [(0, "colour"), (1, "colour")]
            assert base.relation == twin.relation
            assert (twin.objects[0].colour, twin.objects[1].colour) == (
                base.objects[1].colour,
                base.objects[0].colour,
            )
        elif change == "relation_flip":
            assert twin.relation == INVERSE[base.relation]
            # the objects trade places and keep their looks; a third object stays put
            assert {name for _, name in diff} <= {"x", "y"} and {i for i, _ in diff} == {0, 1}
            assert (twin.objects[0].x, twin.objects[0].y) == (base.objects[1].x, base.objects[1].y)
        else:
            assert base.relation == twin.relation
            assert len(diff) == 1 and diff[0][1] == change and diff[0][0] in (0, 1)
    assert set(seen) == set(CHANGES)  # every kind of minimal pair occurs


def test_colour_swap_captions_share_a_bag_of_words(entries):
    """With the same word choices, some caption template of a colour-swapped twin holds exactly
    the words of the original in another order: a bag of words cannot separate the two."""
    by_id = {entry["imgid"]: entry for entry in entries}
    pairs = [
        (scene_of(e), scene_of(by_id[e["twin"]]))
        for e in entries
        if e["twin_change"] == "colour_swap" and e["imgid"] < e["twin"]
    ]
    assert len(pairs) >= 10
    for index, (base, twin) in enumerate(pairs):
        # one word-choice stream for both scenes (the generator draws them independently)
        first = captions_for(base, np.random.default_rng(index))
        second = captions_for(twin, np.random.default_rng(index))
        same_words = [sorted(a.split()) == sorted(b.split()) for a, b in zip(first, second)]
        assert any(same_words), (first, second)
        assert not set(first) & set(second)  # ... yet no caption is true of both images


def test_captions_name_the_scene():
    scene = Scene(
        (
            ShapeObject("circle", "red", "small", 0.2, 0.5),
            ShapeObject("square", "blue", "large", 0.8, 0.5),
        ),
        "left",
    )
    captions = captions_for(scene, np.random.default_rng(0))
    assert len(captions) == 5
    for text in captions:
        assert "red" in text and "blue" in text
    assert any("left" in text for text in captions) and any("right" in text for text in captions)


def test_render_is_deterministic_and_draws_the_colour():
    from io import BytesIO

    from PIL import Image

    scene = Scene((ShapeObject("square", "green", "large", 0.5, 0.5),), None)
    png = render(scene, 20)
    assert png == render(scene, 20)
    with Image.open(BytesIO(png)) as image:
        assert image.getpixel((10, 10)) == (40, 170, 60)
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_captions_tokenize_without_unknown_words(entries):
    from pipeline.text import VILT_MAX_TOKENS, load_tokenizer

    tokenizer = load_tokenizer()
    words = {word for entry in entries for s in entry["sentences"] for word in s["raw"].split()}
    ids = tokenizer(sorted(words), add_special_tokens=False)["input_ids"]
    unknown = [word for word, row in zip(sorted(words), ids) if tokenizer.unk_token_id in row]
    assert not unknown
    longest = max(len(tokenizer(s["raw"])["input_ids"]) for e in entries for s in e["sentences"])
    assert longest <= VILT_MAX_TOKENS


def test_minimal_pair_accuracy_counts_wins_over_the_twin_per_change():
    # rows: images 10, 11 (twins, colour_swap), 12 (twin 13 not evaluated); 2 captions each
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array(
        [
            [5.0, 1.0, 2.0, 2.0, 0.0, 0.0],  # image 10: own 5 beats both twin captions, own 1 not
            [0.0, 9.0, 3.0, 3.0, 0.0, 0.0],  # image 11: ties with itself on own captions
            [0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
        ]
    )
    twins = {10: (11, "colour_swap"), 11: (10, "colour_swap"), 12: (13, "size")}
    got = minimal_pair_accuracy(scores, [10, 11, 12], caption_image, twins)
    assert set(got) == {"colour_swap", "all"}  # image 12's twin is not among the rows
    # image 10, TR: own {5, 1} vs twin {2, 2} -> 2 of 4 wins; image 11, TR: own {3, 3} vs
    # twin {0, 9} -> 1 win, 1 loss, of 4 -> 2 of 4
    assert got["colour_swap"]["tr"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    # IR: caption of 10 scores higher with 10 than with 11: 5 > 0 yes, 1 < 9 no -> 1/2;
    # captions of 11 with 11 (3, 3) vs with 10 (2, 2) -> 2/2
    assert got["colour_swap"]["ir"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["colour_swap"]["images"] == got["all"]["images"] == 2


def test_minimal_pair_accuracy_counts_ties_as_half_and_reads_twins(tmp_path):
    write_shapes(ShapesSpec(train=4, val=2, test=2, image_size=32), tmp_path / "shapes")
    twins = read_twins(tmp_path / "shapes" / "dataset.json")
    assert len(twins) == 8 and all(twins[twins[i][0]][0] == i for i in twins)
    caption_image = np.repeat(np.arange(2), 5)
    got = minimal_pair_accuracy(np.zeros((2, 10)), [6, 7], caption_image, twins)
    assert got["all"] == {"images": 2, "tr": 0.5, "ir": 0.5}
