"""The training loop: schedule, resume equals uninterrupted, NaN stops, atomic checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.models import build_model, load_model
from pipeline.training import Schedule, Trainer, TrainingError

STEPS_PER_EPOCH = 3
BATCH = 4


def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """A pure function of the epoch: STEPS_PER_EPOCH random text-image batches."""
    generator = torch.Generator().manual_seed(100 + epoch)
    for _ in range(STEPS_PER_EPOCH):
        input_ids = torch.randint(1000, 3000, (BATCH, 6), generator=generator)
        yield {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.rand(BATCH, 3, 32, 32, generator=generator) * 2 - 1,
            "pixel_mask": torch.ones(BATCH, 32, 32, dtype=torch.long),
        }


class Loss:
    """Cross-entropy of the batch's logits towards pair 0; `nan_at`: the call that returns NaN."""

    def __init__(self, model, nan_at: int | None = None, stop_at: int | None = None):
        self.model, self.nan_at, self.stop_at, self.calls = model, nan_at, stop_at, 0

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt  # the process dies mid-epoch
        logits = self.model(**batch).logits[:, 0]
        ce = torch.nn.functional.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long))
        if self.calls == self.nan_at:
            ce = ce * float("nan")
        return {"total": ce, "ce": ce.detach()}


def make_trainer(out: Path, epochs: int = 2, warmup: int = 2, lr: float = 1e-3) -> Trainer:
    torch.manual_seed(0)
    schedule = Schedule(epochs, STEPS_PER_EPOCH, lr, warmup, log_every=1)
    return Trainer(build_model("tiny", seed=0), schedule, out, seed=0)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def metric_lines(out: Path) -> list[dict]:
    timing = {"pairs_per_s", "data_wait"}
    return [
        {k: v for k, v in json.loads(line).items() if k not in timing}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_schedule_warms_up_then_decays_to_zero():
    schedule = Schedule(epochs=2, steps_per_epoch=5, lr=1.0, warmup_steps=2)
    factors = [schedule.lr_factor(step) for step in range(11)]
    expected = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert factors == pytest.approx(expected)
    assert Schedule(1, 4, 1.0, warmup_steps=0).lr_factor(0) == 1.0


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, warmup=2, lr=0.01)
    trainer.fit(batches, Loss(trainer.model), BATCH)
    steps = [r for r in metric_lines(tmp_path) if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["lr"] for r in steps] == pytest.approx([0.005, 0.01, 0.01])
    assert all(r["loss"] == r["total"] and r["ce"] == r["total"] for r in steps)


def test_training_changes_the_weights_and_writes_a_checkpoint_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path)
    before = state(trainer.model)
    result = trainer.fit(
        batches, Loss(trainer.model), BATCH, on_epoch_end=lambda epoch: {"probe": epoch * 10}
    )
    assert result.step == 2 * STEPS_PER_EPOCH and result.epoch == 2
    assert not torch.equal(before["rank_output.weight"], trainer.model.rank_output.weight)

    epochs = [r for r in metric_lines(tmp_path) if r["event"] == "epoch"]
    assert epochs == [
        {"event": "epoch", "epoch": 1, "step": 3, "probe": 0},
        {"event": "epoch", "epoch": 2, "step": 6, "probe": 10},
    ]
    checkpoint = tmp_path / "checkpoint"
    assert {"config.json", "trainer.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert_same_weights(state(load_model(checkpoint)), state(trainer.model))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_probe_runs_before_the_first_step_and_every_n_steps(tmp_path):
    trainer = make_trainer(tmp_path)  # 2 epochs of 3 steps
    seen_steps = []

    def probe() -> dict:
        seen_steps.append(trainer.state.step)
        trainer.model.eval()  # the trainer must put the model back in training mode
        return {"score": float(trainer.state.step)}

    trainer.fit(batches, Loss(trainer.model), BATCH, probe=probe, probe_every=2)
    probes = [r for r in metric_lines(tmp_path) if r["event"] == "probe"]
    assert seen_steps == [0, 2, 4, 6]
    assert probes == [
        {"event": "probe", "step": step, "epoch": round(step / STEPS_PER_EPOCH, 4), "score": step}
        for step in (0, 2, 4, 6)
    ]
    assert trainer.state.step == 6


def test_probe_every_zero_probes_only_before_training(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(batches, Loss(trainer.model), BATCH, probe=lambda: {"score": 1.0})
    assert [r["step"] for r in metric_lines(tmp_path) if r["event"] == "probe"] == [0]


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.fit(batches, Loss(straight.model), BATCH)

    # die on the second step of epoch 2: the epoch 1 checkpoint is all that survives
    broken = make_trainer(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        broken.fit(batches, Loss(broken.model, stop_at=STEPS_PER_EPOCH + 2), BATCH)

    resumed = make_trainer(tmp_path / "resumed")
    torch.manual_seed(999)  # whatever the RNG did since, the checkpoint restores it
    assert resumed.resume()
    assert resumed.state.epoch == 1 and resumed.state.step == STEPS_PER_EPOCH
    resumed.fit(batches, Loss(resumed.model), BATCH)

    assert_same_weights(state(resumed.model), state(straight.model))
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 2 * STEPS_PER_EPOCH
    # the interrupted epoch's log line is dropped, so the log reads as one run
    assert metric_lines(tmp_path / "resumed") == metric_lines(tmp_path / "straight")


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = make_trainer(tmp_path)
    assert not trainer.resume()
    assert trainer.state.step == 0


def test_fresh_run_does_not_append_to_an_old_log(tmp_path):
    first = make_trainer(tmp_path, epochs=1)
    first.fit(batches, Loss(first.model), BATCH)
    again = make_trainer(tmp_path, epochs=1)
    again.fit(batches, Loss(again.model), BATCH)
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2, 3, 3]


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    reference = make_trainer(tmp_path / "reference", epochs=1)
    reference.fit(batches, Loss(reference.model), BATCH)

    trainer = make_trainer(tmp_path / "run")
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 5;.*checkpoint.*epoch 1"):
        trainer.fit(batches, Loss(trainer.model, nan_at=STEPS_PER_EPOCH + 2), BATCH)

    checkpoint = tmp_path / "run" / "checkpoint"
    saved = torch.load(checkpoint / "trainer.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1 and saved["state"]["step"] == STEPS_PER_EPOCH
    assert_same_weights(state(load_model(checkpoint)), state(reference.model))


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(
        TrainingError, match="at step 2; no epoch finished, so there is no checkpoint"
    ):
        trainer.fit(batches, Loss(trainer.model, nan_at=2), BATCH)
    assert not (tmp_path / "checkpoint").exists()


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    trainer = make_trainer(tmp_path)
    before = state(trainer.model)

    def loss_with_nan_gradient(batch):
        logits = trainer.model(**batch).logits
        total = torch.sqrt(logits.sum() * 0.0)  # finite value (0), gradient inf * 0 = nan
        return {"total": total}

    with pytest.raises(TrainingError, match="non-finite gradient norm nan at step 1"):
        trainer.fit(batches, loss_with_nan_gradient, BATCH)
    assert_same_weights(state(trainer.model), before)


def test_checkpoint_appears_atomically(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    real_save = torch.save
    saves = []

    def failing_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the second epoch's checkpoint dies half-written
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(batches, Loss(trainer.model), BATCH)

    # the half-written folder is gone; epoch 1's checkpoint is intact and complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]
    saved = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1
    load_model(tmp_path / "checkpoint")
