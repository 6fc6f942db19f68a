"""Teacher fine-tuning end to end on tiny shapes data: it learns, resumes exactly, stops on NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import open_data
from pipeline.groups import make_groups, neighbour_groups
from pipeline.models import load_model
from pipeline.scoring import PairScorer
from pipeline.training import TrainingError
from stages import finetune


def config(tiny, out, *overrides: str) -> finetune.FinetuneConfig:
    base = [
        *tiny.data_overrides(),
        f"model.path={tiny.model_dir}",
        f"out={out}",
        "threads=1",
        "group_size=8",
        "warmup_steps=2",
        "log_every=1",
        "device=cpu",
    ]
    return load_config(finetune.FinetuneConfig, None, [*base, *overrides])


def steps_logged(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@torch.no_grad()
def fixed_batch_loss(model, tiny) -> float:
    """Mean retrieval loss over the 8 groups of round 0 of the training split."""
    data = open_data(tiny.data_config())
    scorer = PairScorer(model.eval(), data.images, data.captions, torch.device("cpu"))
    groups = torch.from_numpy(make_groups(data.split("train"), 8, seed=0, round_index=0))
    return sum(
        finetune.retrieval_loss(scorer, g, ("tr", "ir"))["total"].item() for g in groups
    ) / len(groups)


def test_retrieval_loss_is_cross_entropy_on_the_diagonal():
    class Fixed:
        def group_logits(self, group):
            return torch.tensor([[2.0, 0.0], [1.0, 0.0]])

    terms = finetune.retrieval_loss(Fixed(), torch.zeros(2, 2, dtype=torch.long), ("tr", "ir"))
    # rows rank captions for an image, columns images for a caption; the diagonal is positive
    tr = ((math.log(math.e**2 + 1) - 2) + math.log(math.e + 1)) / 2
    ir = ((math.log(math.e**2 + math.e) - 2) + math.log(2)) / 2
    assert terms["task_tr"].item() == pytest.approx(tr)
    assert terms["task_ir"].item() == pytest.approx(ir)
    assert terms["total"].item() == pytest.approx((tr + ir) / 2)
    only_tr = finetune.retrieval_loss(Fixed(), torch.zeros(2, 2, dtype=torch.long), ("tr",))
    assert set(only_tr) == {"total", "task_tr"} and only_tr["total"] == only_tr["task_tr"]


def test_a_few_steps_lower_the_loss(tiny, tmp_path):
    before = fixed_batch_loss(load_model(tiny.model_dir), tiny)
    summary = finetune.run(config(tiny, tmp_path, "epochs=3", "lr=3e-3"))

    assert summary["steps"] == 24 and summary["layers"] == 2  # 64 images / 8 per group, 3 epochs
    after = fixed_batch_loss(load_model(tmp_path / "model"), tiny)
    assert after < before - 0.01, (before, after)
    logged = steps_logged(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 25))
    assert summary["final_loss"] == logged[-1]["loss"]
    assert {"task_tr", "task_ir", "lr", "pairs_per_s", "data_wait"} <= set(logged[0])
    assert (tmp_path / "config.yaml").is_file()


def test_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    straight = finetune.run(config(tiny, tmp_path / "straight", "epochs=2"))

    # the process dies on the first step of epoch 2, after epoch 1's checkpoint
    real_loss, calls = finetune.retrieval_loss, []

    def dying_loss(*args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(finetune, "retrieval_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(config(tiny, tmp_path / "resumed", "epochs=2"))
    monkeypatch.setattr(finetune, "retrieval_loss", real_loss)

    resumed = finetune.run(config(tiny, tmp_path / "resumed", "epochs=2", "resume=true"))
    assert resumed["steps"] == straight["steps"] == 16
    expected = weights(load_model(tmp_path / "straight" / "model"))
    for name, tensor in weights(load_model(tmp_path / "resumed" / "model")).items():
        assert torch.equal(tensor, expected[name]), name
    assert [r["loss"] for r in steps_logged(tmp_path / "resumed")] == [
        r["loss"] for r in steps_logged(tmp_path / "straight")
    ]


def test_huge_learning_rate_stops_with_an_error_naming_the_step(tiny, tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite .* at step \d+;"):
        finetune.run(config(tiny, tmp_path, "epochs=1", "lr=1e30", "warmup_steps=0"))
    assert not (tmp_path / "model").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_group_larger_than_the_split_is_a_group_error(tiny, tmp_path):
    from pipeline.groups import GroupError

    with pytest.raises(GroupError, match="group size 65"):
        finetune.run(config(tiny, tmp_path, "epochs=1", "group_size=65"))


def test_neighbour_pairing_trains_on_the_neighbour_groups(tiny, tmp_path, monkeypatch):
    seen = []
    real_loss = finetune.retrieval_loss

    def recording_loss(scorer, group, directions):
        seen.append(group.clone())
        return real_loss(scorer, group, directions)

    monkeypatch.setattr(finetune, "retrieval_loss", recording_loss)
    summary = finetune.run(config(tiny, tmp_path, "epochs=2", "pairing=neighbours"))
    train = open_data(tiny.data_config()).split("train")
    expected = [neighbour_groups(train, 8, seed=0, round_index=epoch) for epoch in (0, 1)]
    assert summary["steps"] == len(seen) == sum(len(groups) for groups in expected)
    assert torch.equal(torch.cat(seen), torch.from_numpy(np.concatenate(expected)).flatten(0, 1))
    assert (tmp_path / "model" / "config.json").is_file()


def test_unknown_pairing_is_rejected_with_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match="pairing"):
        config(tiny, tmp_path, "pairing=twins")
