"""Pair scoring: shared image embeddings against the bare model forward, and split invariance."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import open_data
from pipeline.models import build_model
from pipeline.scoring import PairScorer, embed_images


@pytest.fixture(scope="module")
def test_data(tiny):
    return open_data(tiny.data_config(), ("test",))


@pytest.fixture(scope="module")
def model():
    """The tiny preset with every weight perturbed, so logits vary clearly from pair to pair."""
    model = build_model("tiny", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture
def scorer(model, test_data):
    return PairScorer(model, test_data.images, test_data.captions, torch.device("cpu"))


class CountingEmbed:
    """Wraps `visual_embed` and records the number of images in each call."""

    def __init__(self, model):
        self.original = model.vilt.embeddings.visual_embed
        self.calls: list[int] = []

    def __call__(self, pixel_values, *args, **kwargs):
        self.calls.append(len(pixel_values))
        return self.original(pixel_values, *args, **kwargs)


@pytest.fixture
def counter(model, monkeypatch):
    counting = CountingEmbed(model)
    monkeypatch.setattr(model.vilt.embeddings, "visual_embed", counting)
    return counting


def random_pairs(test_data, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image_ids = torch.tensor(test_data.dataset.image_ids())
    caption_ids = torch.tensor(test_data.dataset.caption_ids())
    return (
        image_ids[torch.randint(len(image_ids), (count,), generator=generator)],
        caption_ids[torch.randint(len(caption_ids), (count,), generator=generator)],
    )


@torch.no_grad()
def bare_logits(model, test_data, image_ids, caption_ids) -> torch.Tensor:
    """The oracle: transformers' own forward on pixels, one full input row per pair."""
    pixels, pixel_mask = test_data.images.batch(image_ids.tolist())
    input_ids, attention_mask = test_data.captions.batch(caption_ids)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels,
        pixel_mask=pixel_mask,
    )
    return output.logits[:, 0]


def test_logits_equal_the_bare_model_forward(model, scorer, test_data):
    image_ids, caption_ids = random_pairs(test_data, 48, seed=0)
    with torch.no_grad():
        fast = scorer.logits(image_ids, caption_ids)
    expected = bare_logits(model, test_data, image_ids, caption_ids)
    assert fast.shape == (48,)
    assert expected.std() > 0.05  # not a constant model, so the comparison means something
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)


def test_image_embeddings_do_not_depend_on_the_random_patch_order(model, test_data):
    pixels, mask = test_data.images.batch(test_data.dataset.image_ids()[:3])
    torch.manual_seed(0)
    first, first_mask = embed_images(model, pixels, mask)
    torch.manual_seed(123)
    second, second_mask = embed_images(model, pixels, mask)
    assert torch.equal(first, second) and torch.equal(first_mask, second_mask)
    patches = (32 // 16) ** 2
    assert first.shape == (3, 1 + patches, 32)


def test_each_distinct_image_is_embedded_once_per_call(scorer, test_data, counter):
    image_ids = torch.tensor(test_data.dataset.image_ids()[:4]).repeat_interleave(6)  # 24 pairs
    _, caption_ids = random_pairs(test_data, 24, seed=1)
    with torch.no_grad():
        scorer.logits(image_ids, caption_ids)
    assert counter.calls == [4]


def test_group_logits_embed_each_image_once_and_index_image_by_caption(scorer, test_data, counter):
    image_ids = test_data.dataset.image_ids()[:5]
    caption_ids = [test_data.dataset.image(i).caption_ids[0] for i in image_ids]
    group = torch.tensor(list(zip(image_ids, caption_ids)))
    with torch.no_grad():
        matrix = scorer.group_logits(group)
        pair = scorer.logits(torch.tensor([image_ids[3]]), torch.tensor([caption_ids[1]]))
    assert counter.calls == [5, 1]
    assert matrix.shape == (5, 5)
    torch.testing.assert_close(matrix[3, 1], pair[0], rtol=0, atol=1e-6)  # [image i, caption j]


@pytest.mark.parametrize("pairs_per_batch", [1, 7, 25, 100])
def test_group_logits_in_chunks_match_one_pass(scorer, test_data, counter, pairs_per_batch):
    image_ids = test_data.dataset.image_ids()[:5]
    caption_ids = [test_data.dataset.image(i).caption_ids[1] for i in image_ids]
    group = torch.tensor(list(zip(image_ids, caption_ids)))
    with torch.no_grad():
        whole = scorer.group_logits(group)
        chunked = scorer.group_logits(group, pairs_per_batch)
    assert counter.calls == [5, 5]  # the images are embedded once however many passes
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_matrix_embeds_each_image_once_even_across_caption_chunks(scorer, test_data, counter):
    image_ids = test_data.dataset.image_ids()[:3]
    caption_ids = test_data.dataset.caption_ids()  # 80 captions in chunks of 16
    scores = scorer.matrix(image_ids, caption_ids, pairs_per_batch=16)
    assert scores.shape == (3, 80)
    assert counter.calls == [1, 1, 1]


def test_matrix_rows_do_not_depend_on_the_other_images(scorer, test_data):
    image_ids = test_data.dataset.image_ids()
    caption_ids = test_data.dataset.caption_ids()
    together = scorer.matrix(image_ids[:6], caption_ids, pairs_per_batch=32)
    one_by_one = torch.cat(
        [scorer.matrix([i], caption_ids, pairs_per_batch=32) for i in reversed(image_ids[:6])]
    ).flip(0)
    split = torch.cat(
        [
            scorer.matrix(image_ids[:2], caption_ids, pairs_per_batch=32),
            scorer.matrix(image_ids[2:6], caption_ids, pairs_per_batch=32),
        ]
    )
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, split)


def test_matrix_equals_pairwise_logits(model, scorer, test_data):
    image_ids = test_data.dataset.image_ids()[:2]
    caption_ids = test_data.dataset.caption_ids()[:30]
    scores = scorer.matrix(image_ids, caption_ids, pairs_per_batch=7)
    pairs_image = torch.tensor(image_ids).repeat_interleave(30)
    pairs_caption = torch.tensor(caption_ids).repeat(2)
    expected = bare_logits(model, test_data, pairs_image, pairs_caption).view(2, 30)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert scores.device.type == "cpu" and scores.dtype == torch.float32


def test_empty_matrix_has_the_caption_width(scorer, test_data):
    assert scorer.matrix([], test_data.dataset.caption_ids()).shape == (0, 80)


def test_logits_are_differentiable_in_train_mode(model, test_data):
    scorer = PairScorer(model, test_data.images, test_data.captions, torch.device("cpu"))
    image_ids, caption_ids = random_pairs(test_data, 6, seed=2)
    model.train()
    try:
        scorer.logits(image_ids, caption_ids).sum().backward()
        grad = model.vilt.embeddings.patch_embeddings.projection.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
