"""Retrieval metrics: a hand-worked example, a sorting oracle with ties, COCO 1K folds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import recall
from pipeline.recall import five_fold_metrics, retrieval_metrics


def brute_force_ranks(scores: np.ndarray, caption_image: np.ndarray) -> tuple[list, list]:
    """Explicit stable sorts; among equal scores the positive is placed after the negatives."""
    n_images, n_captions = scores.shape
    tr_ranks = []
    for i in range(n_images):
        is_own = [caption_image[j] == i for j in range(n_captions)]
        order = sorted(range(n_captions), key=lambda j: (-scores[i, j], is_own[j]))
        tr_ranks.append(1 + min(pos for pos, j in enumerate(order) if is_own[j]))
    ir_ranks = []
    for j in range(n_captions):
        target = caption_image[j]
        order = sorted(range(n_images), key=lambda i: (-scores[i, j], i == target))
        ir_ranks.append(1 + order.index(target))
    return tr_ranks, ir_ranks


def brute_force_metrics(scores: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    tr_ranks, ir_ranks = brute_force_ranks(scores, caption_image)
    out = {}
    for name, ranks in (("tr", tr_ranks), ("ir", ir_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    for name, ranks in (("tr", tr_ranks), ("ir", ir_ranks)):
        out[f"{name}_medr"] = float(np.median(ranks))
        out[f"{name}_meanr"] = sum(ranks) / len(ranks)
    out["n_images"], out["n_captions"] = scores.shape
    return out


def random_case(rng, n_images: int, captions_per_image: int | None):
    """Integer-valued scores in 0..3, so ties are everywhere; captions in shuffled order."""
    if captions_per_image is None:
        counts = rng.integers(1, 8, size=n_images)
    else:
        counts = np.full(n_images, captions_per_image)
    caption_image = rng.permutation(np.repeat(np.arange(n_images), counts))
    scores = rng.integers(0, 4, size=(n_images, len(caption_image))).astype(np.float32)
    return scores, caption_image


def test_hand_worked_two_images_four_captions():
    caption_image = np.array([0, 0, 1, 1])
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.9],
            [0.4, 0.8, 0.3, 0.9],
        ],
        dtype=np.float32,
    )
    # TR image 0: best own 0.9 (caption 0) ties negative caption 3 -> rank 2.
    # TR image 1: best own 0.9 (caption 3), no negative >= 0.9 -> rank 1.
    # IR: caption 0 column (0.9, 0.4) -> 1; caption 1 (0.1, 0.8) -> 2;
    #     caption 2 (0.5, 0.3) -> 2; caption 3 (0.9, 0.9), tie -> 2.
    metrics = retrieval_metrics(scores, caption_image)
    assert metrics == {
        "tr_r1": 50.0, "tr_r5": 100.0, "tr_r10": 100.0,
        "ir_r1": 25.0, "ir_r5": 100.0, "ir_r10": 100.0,
        "rsum": 475.0,
        "tr_medr": 1.5, "tr_meanr": 1.5, "ir_medr": 2.0, "ir_meanr": 1.75,
        "n_images": 2, "n_captions": 4,
    }  # fmt: skip


def test_custom_ks_name_the_keys():
    scores = np.eye(3, dtype=np.float32)
    metrics = retrieval_metrics(scores, np.arange(3), ks=(1, 2))
    assert metrics["tr_r1"] == metrics["tr_r2"] == metrics["ir_r2"] == 100.0
    assert metrics["rsum"] == 400.0
    assert "tr_r5" not in metrics


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 18])
@pytest.mark.parametrize(
    ("n_images", "captions_per_image"), [(1, 5), (3, 5), (12, 5), (25, 5), (9, None), (30, None)]
)
def test_matches_sorting_oracle_with_ties(
    monkeypatch, chunk_elements, n_images, captions_per_image
):
    monkeypatch.setattr(recall, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(1000 * n_images + (captions_per_image or 0))
    for _ in range(3):
        scores, caption_image = random_case(rng, n_images, captions_per_image)
        expected = brute_force_metrics(scores, caption_image)
        got = retrieval_metrics(scores, caption_image)
        assert got == pytest.approx(expected)


def test_constant_scores_rank_pessimistically():
    caption_image = np.repeat(np.arange(4), 5)
    metrics = retrieval_metrics(np.zeros((4, 20), dtype=np.float32), caption_image)
    assert metrics["tr_r1"] == metrics["ir_r1"] == 0.0
    assert metrics["tr_meanr"] == 16.0  # 1 + all 15 negatives
    assert metrics["ir_meanr"] == 4.0  # below all 3 other images

    # A single image: no negative exists in either direction.
    single = retrieval_metrics(np.zeros((1, 5), dtype=np.float32), np.zeros(5, dtype=int))
    assert single["tr_r1"] == single["ir_r1"] == 100.0


def test_integer_and_infinite_scores():
    caption_image = np.array([0, 1, 1])
    as_int = retrieval_metrics(np.array([[3, 1, 1], [0, 2, 2]]), caption_image)
    assert as_int["tr_r1"] == as_int["ir_r1"] == 100.0
    masked = np.array([[0.0, -np.inf, -np.inf], [-np.inf, 1.0, -np.inf]])
    metrics = retrieval_metrics(masked, caption_image)
    assert metrics == pytest.approx(brute_force_metrics(masked, caption_image))


def test_five_fold_is_mean_of_manual_folds():
    rng = np.random.default_rng(5)
    n_images, folds = 20, 5
    caption_image = np.repeat(np.arange(n_images), 5)
    scores = rng.integers(0, 6, size=(n_images, 5 * n_images)).astype(np.float32)
    block = n_images // folds
    manual = [
        brute_force_metrics(
            scores[f * block : (f + 1) * block, f * 5 * block : (f + 1) * 5 * block],
            caption_image[f * 5 * block : (f + 1) * 5 * block] - f * block,
        )
        for f in range(folds)
    ]
    got = five_fold_metrics(scores, caption_image, folds=folds)
    assert got["folds"] == folds
    assert got["n_images"] == block and got["n_captions"] == 5 * block
    for key in manual[0]:
        assert got[key] == pytest.approx(np.mean([m[key] for m in manual])), key


def test_five_fold_ignores_off_diagonal_blocks_and_handles_shuffled_captions():
    rng = np.random.default_rng(6)
    scores, caption_image = random_case(rng, 12, None)
    expected = five_fold_metrics(scores, caption_image, folds=3)
    noisy = scores.copy()
    block_of_row = np.arange(12)[:, None] // 4
    block_of_caption = caption_image[None, :] // 4
    noisy[block_of_row != block_of_caption] = 100.0
    assert five_fold_metrics(noisy, caption_image, folds=3) == expected
    assert five_fold_metrics(scores, caption_image, folds=1) == {
        **retrieval_metrics(scores, caption_image),
        "folds": 1,
    }


def test_five_fold_needs_divisible_image_count():
    with pytest.raises(ValueError, match="12 images.*7 equal blocks"):
        five_fold_metrics(np.zeros((12, 12)), np.arange(12), folds=7)


@pytest.mark.parametrize(
    ("scores", "caption_image", "message"),
    [
        (np.zeros((2, 4)), np.array([0, 0, 1]), "one entry per caption"),
        (np.zeros(4), np.array([0, 0, 1, 1]), "matrix"),
        (np.zeros((2, 4)), np.array([0, 0, 1, 2]), "out of range: caption 3 .* row 2"),
        (np.zeros((2, 4)), np.array([0, 0, -1, 1]), "out of range: caption 2"),
        (np.zeros((2, 4)), np.array([0.0, 0, 1, 1]), "integer"),
        (np.zeros((3, 4)), np.array([0, 0, 1, 1]), "image row 2 has no caption"),
        (np.array([[0, 1, 2, 3], [0, 1, np.nan, 3]]), np.array([0, 0, 1, 1]), "NaN.*row 1"),
    ],
)
def test_bad_input_names_the_problem(scores, caption_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(scores, caption_image)
