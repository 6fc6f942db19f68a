"""In-batch groups: distinct images, one caption each, no repeated caption text, seeded rounds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.groups import (
    NEIGHBOURS,
    GroupError,
    caption_neighbours,
    iter_groups,
    make_groups,
    neighbour_groups,
)
from pipeline.karpathy import RetrievalDataset, load_karpathy


@pytest.fixture
def repetitive(make_karpathy) -> RetrievalDataset:
    """24 train images whose captions repeat a handful of texts (case and spacing vary).

    Every image has "a dog" three times (in case and spacing variants), "two cats", and a text
    shared with three other images, so groups fill only by skipping captions and deferring
    images.
    """
    files = make_karpathy("flickr", {"train": 24, "test": 2})
    common = ["a dog", "A  dog", "a DOG ", "two cats"]
    for row, item in enumerate(files.rows):
        for k, sentence in enumerate(item["sentences"]):
            sentence["raw"] = common[k] if k < 4 else f"shared text {row // 4}"
    files.rewrite()
    return load_karpathy(files.json_path, files.image_root).split("train")


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def check_groups(dataset: RetrievalDataset, groups: np.ndarray, group_size: int) -> None:
    assert groups.dtype == np.int64 and groups.shape[1:] == (group_size, 2)
    for group in groups:
        image_ids, caption_ids = group[:, 0].tolist(), group[:, 1].tolist()
        assert len(set(image_ids)) == group_size, "an image appears twice in a group"
        for image_id, caption_id in zip(image_ids, caption_ids):
            assert dataset.caption_image[caption_id] == image_id, "caption of another image"
        texts = [normalised(dataset.captions[c]) for c in caption_ids]
        assert len(set(texts)) == group_size, f"repeated caption text in a group: {texts}"
    all_images = groups[:, :, 0].ravel().tolist()
    assert len(all_images) == len(set(all_images)), "an image used twice in one round"


def test_groups_have_distinct_images_and_caption_texts(repetitive):
    for round_index in range(5):
        groups = make_groups(repetitive, group_size=5, seed=0, round_index=round_index)
        check_groups(repetitive, groups, 5)
        assert len(groups) >= 3  # most images still find a place


def test_group_size_beyond_the_distinct_texts_gives_no_group(repetitive):
    # 8 distinct normalised texts in the split: "a dog", "two cats" and 6 shared texts
    check_groups(repetitive, make_groups(repetitive, group_size=8, seed=1), 8)
    assert make_groups(repetitive, group_size=9, seed=1).shape == (0, 9, 2)


def test_groups_cover_a_clean_split_without_repeats(tiny):
    from pipeline.data import dataset_spec

    train = dataset_spec(tiny.data_config()).load().split("train")
    groups = make_groups(train, group_size=8, seed=3, round_index=0)
    check_groups(train, groups, 8)
    assert len(groups) >= 7  # 64 images; a rare repeated text may push one image out


def test_same_seed_and_round_give_the_same_groups(repetitive):
    first = make_groups(repetitive, 4, seed=7, round_index=2)
    assert np.array_equal(first, make_groups(repetitive, 4, seed=7, round_index=2))
    assert np.array_equal(first, np.stack(list(iter_groups(repetitive, 4, 7, 2))))


def test_rounds_and_seeds_give_different_groups(repetitive):
    base = make_groups(repetitive, 4, seed=7, round_index=0)
    assert not np.array_equal(base, make_groups(repetitive, 4, seed=7, round_index=1))
    assert not np.array_equal(base, make_groups(repetitive, 4, seed=8, round_index=0))


def test_every_image_is_used_when_texts_are_unique(make_karpathy):
    files = make_karpathy("flickr", {"train": 12})
    dataset = load_karpathy(files.json_path, files.image_root)
    groups = make_groups(dataset, 4, seed=0)
    check_groups(dataset, groups, 4)
    assert sorted(groups[:, :, 0].ravel().tolist()) == sorted(dataset.image_ids())


def test_leftover_images_are_dropped(make_karpathy):
    files = make_karpathy("flickr", {"train": 10})
    dataset = load_karpathy(files.json_path, files.image_root)
    assert make_groups(dataset, 4, seed=0).shape == (2, 4, 2)
    assert make_groups(dataset, 10, seed=0).shape == (1, 10, 2)


@pytest.mark.parametrize("group_size", [0, 1, 25, 100])
def test_group_size_outside_the_split_is_an_error(repetitive, group_size):
    with pytest.raises(GroupError, match=rf"group size {group_size} must be in \[2, 24\].*train"):
        make_groups(repetitive, group_size, seed=0)


@pytest.fixture
def couples(make_karpathy) -> RetrievalDataset:
    """20 train images in 10 couples: both images of couple k share the words of `topic k`."""
    files = make_karpathy("flickr", {"train": 20, "test": 2})
    for row, item in enumerate(files.rows[:20]):
        couple, side = divmod(row, 2)
        for k, sentence in enumerate(item["sentences"]):
            sentence["raw"] = f"topic{couple} thing{couple} seen {'left' if side else 'right'} {k}"
    files.rewrite()
    return load_karpathy(files.json_path, files.image_root).split("train")


def test_caption_neighbours_rank_the_image_sharing_the_most_words_first(couples):
    neighbours = caption_neighbours(couples)
    assert neighbours.shape == (20, NEIGHBOURS)
    assert neighbours[:, 0].tolist() == [row ^ 1 for row in range(20)]  # the other of the couple
    assert not (neighbours == np.arange(20)[:, None]).any(), "an image is its own neighbour"


def test_neighbour_groups_keep_couples_together_and_follow_the_group_rules(couples):
    for round_index in range(3):
        groups = neighbour_groups(couples, group_size=4, seed=5, round_index=round_index)
        check_groups(couples, groups, 4)
        assert len(groups) == 5  # all 20 images: every couple pairs up
        for group in groups:
            rows = sorted(couples.image_ids().index(i) for i in group[:, 0])
            assert {r // 2 for r in rows} == {rows[0] // 2, rows[2] // 2}  # two whole couples
    first = neighbour_groups(couples, 4, seed=5, round_index=0)
    assert np.array_equal(first, neighbour_groups(couples, 4, seed=5, round_index=0))
    assert not np.array_equal(first, neighbour_groups(couples, 4, seed=5, round_index=1))


def test_neighbour_groups_still_follow_the_rules_on_repetitive_captions(repetitive):
    check_groups(repetitive, neighbour_groups(repetitive, group_size=4, seed=0), 4)


@pytest.mark.parametrize("size", [3, 0, 100])
def test_neighbour_groups_need_an_even_size_within_the_split(couples, size):
    with pytest.raises(GroupError, match=f"group size {size} must be even"):
        neighbour_groups(couples, group_size=size, seed=0)
