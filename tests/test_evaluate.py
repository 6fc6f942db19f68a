"""Full-matrix evaluation on tiny shapes data: metrics.json, shortlists, Ray equals in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import open_data
from pipeline.models import load_model
from pipeline.recall import retrieval_metrics
from pipeline.scoring import PairScorer
from pipeline.shapes import minimal_pair_accuracy, read_twins
from stages import evaluate

METRIC_KEYS = {
    "tr_r1",
    "tr_r5",
    "tr_r10",
    "ir_r1",
    "ir_r5",
    "ir_r10",
    "rsum",
    "tr_medr",
    "tr_meanr",
    "ir_medr",
    "ir_meanr",
    "n_images",
    "n_captions",
}
SUMMARY_KEYS = {
    "minimal_pairs",  # the tiny data is generated shapes, whose rows name their twins
    "model",
    "dataset",
    "split",
    "shortlist",
    "metrics",
    "parameters",
    "layers",
    "pairs",
    "seconds",
    "pairs_per_s",
    "latency_ms_per_pair",
    "workers",
}


def eval_config(tiny, out, **fields) -> evaluate.EvaluateConfig:
    return evaluate.EvaluateConfig(
        model=tiny.model_dir, data=tiny.data_config(), out=out, threads=1, device="cpu", **fields
    )


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    return out, evaluate.run(eval_config(tiny, out, pairs_per_batch=64))


def test_metrics_file_has_every_key_and_counts_every_pair(full_run, tiny):
    out, summary = full_run
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written) == SUMMARY_KEYS
    assert set(written["metrics"]) == METRIC_KEYS
    assert written["pairs"] == 16 * 80  # every test image x every test caption
    assert written["metrics"]["n_images"] == 16 and written["metrics"]["n_captions"] == 80
    assert written["shortlist"] is None and written["split"] == "test"
    assert written["layers"] == 2 and written["parameters"] > 0
    for name in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert 0 <= written["metrics"][name] <= 100, name
    assert (
        written["metrics"]["tr_r1"] <= written["metrics"]["tr_r5"] <= written["metrics"]["tr_r10"]
    )
    assert (out / "config.yaml").is_file()


def test_minimal_pairs_follow_from_the_scores(full_run, tiny):
    out, summary = full_run
    scores = np.load(out / "scores.npy")
    dataset = open_data(tiny.data_config(), ("test",)).dataset
    image_ids = dataset.image_ids()
    caption_image = np.array(
        [image_ids.index(dataset.caption_image[c]) for c in dataset.caption_ids()]
    )
    twins = read_twins(dataset.json_path)
    expected = minimal_pair_accuracy(scores, image_ids, caption_image, twins)
    assert summary["minimal_pairs"] == expected and expected["all"]["images"] == 16
    assert "minimal pairs, share own > twin" in evaluate.format_table(summary)


def test_scores_are_the_model_scores_and_metrics_follow_from_them(full_run, tiny):
    out, summary = full_run
    scores = np.load(out / "scores.npy")
    data = open_data(tiny.data_config(), ("test",))
    scorer = PairScorer(load_model(tiny.model_dir), data.images, data.captions, torch.device("cpu"))
    image_ids, caption_ids = data.dataset.image_ids(), data.dataset.caption_ids()
    expected = scorer.matrix(image_ids, caption_ids, pairs_per_batch=64).numpy()
    assert scores.shape == (16, 80) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, expected)

    caption_image = np.array([image_ids.index(data.dataset.caption_image[c]) for c in caption_ids])
    assert summary["metrics"] == retrieval_metrics(scores, caption_image)


def test_max_images_restricts_and_the_report_names_the_shortlist(tiny, tmp_path):
    summary = evaluate.run(eval_config(tiny, tmp_path, max_images=4))
    assert summary["shortlist"] == "first 4 images"
    assert summary["pairs"] == 4 * 20  # only the captions of those images
    assert np.load(tmp_path / "scores.npy").shape == (4, 20)
    assert "shortlist: first 4 images" in evaluate.format_table(summary)


def test_table_shows_recall_and_five_fold_when_asked(tiny, tmp_path):
    summary = evaluate.run(eval_config(tiny, tmp_path, max_images=10, five_fold=True))
    table = evaluate.format_table(summary)
    assert summary["five_fold"]["folds"] == 5
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[1].startswith("TR") and lines[2].startswith("IR")
    assert f"{summary['metrics']['rsum']:.1f}" in lines[3]
    assert "1K five-fold" in table


def test_other_split_is_scored(tiny, tmp_path):
    summary = evaluate.run(eval_config(tiny, tmp_path, split="val"))
    assert summary["split"] == "val" and summary["pairs"] == 16 * 80


@pytest.mark.slow
def test_ray_workers_give_exactly_the_in_process_scores(tiny, tmp_path, full_run):
    import ray

    out, _ = full_run
    try:
        summary = evaluate.run(eval_config(tiny, tmp_path, workers=2, pairs_per_batch=64))
    finally:
        ray.shutdown()
    assert summary["workers"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), np.load(out / "scores.npy"))


def test_five_fold_on_a_count_not_divisible_by_five_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="five_fold: the 7 images .* max_images to a multiple"):
        evaluate.run(eval_config(tiny, tmp_path, max_images=7, five_fold=True))
    assert not (tmp_path / "scores.npy").exists()
