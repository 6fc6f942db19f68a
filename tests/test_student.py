"""The student stage (stages/student.py) on a tiny cache: selection, online = cached, variants,
resume, refusals, NaN handling and what it writes.

    .venv/bin/python -m pytest tests/test_student.py -x -q
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.candidates import CACHE_COLUMNS, cache_batches, choose, gather_pairs
from pipeline.config import ConfigError, load_config
from pipeline.data import open_data
from pipeline.models import load_model, make_student
from pipeline.scoring import PairScorer
from pipeline.shapes import ShapesSpec, write_shapes
from pipeline.shards import CacheError
from pipeline.streaming import shuffled_batches
from pipeline.training import Trainer, TrainingError
from stages import student
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
VARIANTS = sorted((REPO / "configs" / "variants").glob("*.yaml"))
GROUP_SIZE, KEEP, ROUNDS = 16, 4, 2
# 64 train images in groups of 16, two directions: 128 rows per round, 4 steps of K = 32
QUERIES, STEPS_PER_EPOCH = 32, 4
TERMS = {"total", "task", "distill", "w_mean", "w_max", "c_mean", "c_max", "wsl_mean"}


@pytest.fixture(scope="module")
def setup(tiny_cache) -> dict:
    return tiny_cache


def overrides(tiny, setup, out: Path, *extra: str) -> list[str]:
    return [
        *tiny.data_overrides(),
        f"cache={setup['cache']}",
        f"teacher={setup['teacher']}",
        f"out={out}",
        "student_layers=[1]",
        f"candidates={GROUP_SIZE}",
        f"keep={KEEP}",
        f"batch_queries={QUERIES}",
        "epochs=1",
        "threads=1",
        "device=cpu",
        "log_every=1",
        "warmup_steps=2",
        "evaluate=false",
        *extra,
    ]


def make_config(tiny, setup, out: Path, *extra: str, variant: str = "dcd") -> student.StudentConfig:
    path = REPO / "configs" / "variants" / f"{variant}.yaml"
    return load_config(student.StudentConfig, path, overrides(tiny, setup, out, *extra))


def logged(out: Path, event: str = "step") -> list[dict]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [record for record in records if record["event"] == event]


# --- one batch, no training loop --------------------------------------------------------------


@pytest.fixture(scope="module")
def scorers(tiny, setup) -> dict:
    """The teacher and a 1-layer student as PairScorers over train + val, and one cache batch."""
    data = open_data(tiny.data_config(), ("train", "val"))
    teacher = load_model(setup["teacher"])
    cpu = torch.device("cpu")

    def reader():
        return shuffled_batches(
            setup["cache"],
            seed=0,
            buffer_rows=256,
            batch_rows=QUERIES,
            columns=CACHE_COLUMNS,
            rounds=[0],
        )

    return {
        "data": data,
        "teacher": PairScorer(teacher, data.images, data.captions, cpu),
        "student": PairScorer(make_student(teacher, [1]), data.images, data.captions, cpu),
        "drawn": next(iter(cache_batches(reader, GROUP_SIZE))),
    }


class TruePairScorer:
    """A stand-in student: logit 10 for an (image, its own caption) pair, 0 otherwise."""

    def __init__(self, caption_image: dict[int, int]):
        self.caption_image = caption_image

    def logits(self, image_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        own = [self.caption_image[c] == i for i, c in zip(image_ids.tolist(), caption_ids.tolist())]
        return 10.0 * torch.tensor(own, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["dcd", "finetune", "vanilla_kd"])
def test_the_positive_is_column_zero_after_selection(tiny, setup, scorers, variant, tmp_path):
    config = make_config(tiny, setup, tmp_path, variant=variant)
    drawn = scorers["drawn"]
    assert (drawn.teacher_logits.argmax(dim=1) != 0).any()  # the teacher errs on some queries
    columns, _ = choose(drawn.teacher_logits, KEEP, config.selection, config.adjust)
    image_ids, caption_ids = gather_pairs(drawn, columns)
    caption_image = scorers["data"].dataset.caption_image
    assert all(
        caption_image[c] == i for i, c in zip(image_ids[:, 0].tolist(), caption_ids[:, 0].tolist())
    )

    # the loss sees the same order: only column 0 scores high, so each query's CE is tiny
    terms = student.StudentLoss(config, TruePairScorer(caption_image), None)(drawn)
    expected = math.log(1 + (KEEP - 1) * math.exp(-10))
    assert terms["task"].item() == pytest.approx(expected, rel=1e-3)


def test_online_and_cached_teacher_give_the_same_losses(tiny, setup, scorers, tmp_path):
    drawn = scorers["drawn"]
    online = student.StudentLoss(
        make_config(tiny, setup, tmp_path, "online=true"), scorers["student"], scorers["teacher"]
    )
    cached = student.StudentLoss(make_config(tiny, setup, tmp_path), scorers["student"], None)
    assert torch.allclose(online.teacher_logits(drawn), drawn.teacher_logits, atol=1e-5)

    with torch.no_grad():
        online_terms, cached_terms = online(drawn), cached(drawn)
    assert set(online_terms) == TERMS
    for name in TERMS:
        assert online_terms[name].item() == pytest.approx(
            cached_terms[name].item(), abs=1e-5, rel=1e-5
        ), name


def w_max(config, student_scorer, drawn) -> float:
    with torch.no_grad():
        return student.StudentLoss(config, student_scorer, None)(drawn)["w_max"].item()


def test_uncertainty_weights_come_from_the_student_or_the_teacher(tiny, setup, scorers, tmp_path):
    drawn = scorers["drawn"]
    sharper = copy.copy(drawn)
    sharper.teacher_logits = 3.0 * drawn.teacher_logits  # another teacher: other entropies
    perturbed = copy.deepcopy(scorers["student"].model)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    other_student = PairScorer(
        perturbed, scorers["data"].images, scorers["data"].captions, torch.device("cpu")
    )

    by_student = make_config(tiny, setup, tmp_path, variant="student_uncertainty")
    assert by_student.loss.uncertainty_from == "student" and by_student.loss.weight_hard
    base = w_max(by_student, scorers["student"], drawn)
    assert w_max(by_student, scorers["student"], sharper) == pytest.approx(base, rel=1e-6)
    assert w_max(by_student, other_student, drawn) != pytest.approx(base, rel=1e-3)

    by_teacher = make_config(tiny, setup, tmp_path, variant="dcd")
    base = w_max(by_teacher, scorers["student"], drawn)
    assert w_max(by_teacher, scorers["student"], sharper) != pytest.approx(base, rel=1e-3)
    assert w_max(by_teacher, other_student, drawn) == pytest.approx(base, rel=1e-6)


def test_separability_means_of_positive_and_top3_negatives():
    class Fixed:
        model = torch.nn.Linear(1, 1).eval()

        def group_logits(self, group):
            assert not self.model.training
            return torch.tensor([[5.0, 1.0, 2.0, 3.0, 4.0]] + [[0.0] * 5] * 4)

    scorer = Fixed()
    scores = student.separability(scorer, torch.zeros(1, 5, 2, dtype=torch.long))
    # rows: positives 5, 0, 0, 0, 0; top-3 negatives (4, 3, 2) and 0s; columns: positives the
    # same, negatives of column 0 are 0s, of column j > 0 the value in row 0 and two 0s
    assert scores["val_positive"] == pytest.approx(1.0)
    assert scores["val_top3_negative"] == pytest.approx((9 + 10) / 30)
    assert scorer.model.training  # back in training mode for the next epoch


# --- training runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_every_variant_trains_one_epoch(tiny, setup, tmp_path, path):
    assert len(VARIANTS) == 8
    summary = student.run(make_config(tiny, setup, tmp_path, variant=path.stem))
    assert summary["variant"] == path.stem and summary["steps"] == STEPS_PER_EPOCH
    steps = logged(tmp_path)
    assert len(steps) == STEPS_PER_EPOCH
    assert all(math.isfinite(r[name]) for r in steps for name in TERMS)
    assert (tmp_path / "model" / "config.json").is_file()

    # the variant's switches reach the loss: uniform weights are exactly 1/K, no distillation
    # is exactly 0, WSL's omega is below 1
    first = steps[0]
    weighted = {
        "w": first["w_max"] > 1.01 / QUERIES,
        "c": first["c_max"] > 1.0001 / QUERIES,
        "distill": first["distill"] > 0,
        "wsl": first["wsl_mean"] < 1,
    }
    expected = {
        "finetune": set(),
        "vanilla_kd": {"distill"},
        "wsl_kd": {"distill", "wsl"},
        "ds_ka": {"distill"},
        "ds_ka_hw": {"distill", "w"},
        "ds_ka_sw": {"distill", "c"},
        "dcd": {"distill", "w", "c"},
        "student_uncertainty": {"distill", "w", "c"},
    }[path.stem]
    assert {name for name, on in weighted.items() if on} == expected


def test_metrics_and_summary(tiny, setup, tmp_path):
    summary = student.run(make_config(tiny, setup, tmp_path, "evaluate=true", "eval_max_images=4"))
    steps = logged(tmp_path)
    assert [r["step"] for r in steps] == list(range(1, STEPS_PER_EPOCH + 1))
    for record in steps:
        assert TERMS | {"lr", "pairs_per_s", "data_wait", "epoch"} <= set(record)
        assert record["pairs_per_s"] > 0 and 0 <= record["data_wait"] <= 1
        assert record["total"] == pytest.approx(0.2 * record["distill"] + 0.8 * record["task"])
    assert [r["lr"] for r in steps][:2] == pytest.approx([2.5e-4, 5e-4])  # warmup over 2 steps

    epochs = logged(tmp_path, "epoch")
    assert len(epochs) == 1 and {"val_positive", "val_top3_negative"} <= set(epochs[0])

    written = json.loads((tmp_path / "summary.json").read_text())
    metrics = written["test"]["metrics"]
    assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"} <= set(metrics)
    assert metrics["rsum"] == pytest.approx(
        sum(metrics[k] for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"))
    )
    assert written["test"]["shortlist"] == "first 4 images" and metrics["n_images"] == 4
    assert written["steps"] == summary["steps"] == STEPS_PER_EPOCH
    assert written["pairs_per_s"] > 0 and (tmp_path / "config.yaml").is_file()


class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(tiny, setup, tmp_path, monkeypatch):
    straight = student.run(make_config(tiny, setup, tmp_path / "straight", "epochs=2"))

    # the same run killed right after its first epoch checkpoint, then resumed
    save = Trainer.save_checkpoint

    def save_then_stop(self):
        save(self)
        raise Interrupted

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        student.run(make_config(tiny, setup, tmp_path / "resumed", "epochs=2"))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    call, calls = student.StudentLoss.__call__, []
    monkeypatch.setattr(
        student.StudentLoss, "__call__", lambda self, drawn: calls.append(1) or call(self, drawn)
    )
    resumed = student.run(make_config(tiny, setup, tmp_path / "resumed", "epochs=2", "resume=true"))

    assert len(calls) == STEPS_PER_EPOCH  # only the second epoch ran again
    assert resumed["steps"] == straight["steps"] == 2 * STEPS_PER_EPOCH
    a = load_model(tmp_path / "straight" / "model").state_dict()
    b = load_model(tmp_path / "resumed" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["total"] for r in logged(tmp_path / run)] for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 2 * STEPS_PER_EPOCH


# --- refusals ---------------------------------------------------------------------------------


def test_cache_of_another_dataset_is_refused_naming_it(tiny, setup, tmp_path):
    sizes = {"train": 64, "val": 16, "test": 16}
    json_path = write_shapes(ShapesSpec(image_size=32, seed=1, **sizes), tmp_path / "other")
    manifest = tmp_path / "data_manifest.yaml"
    entry = {
        "kind": "generated",
        "json_path": str(json_path),
        "captions_per_image": 5,
        "image_root": str(json_path.parent / "images"),
        "splits": sizes,
    }
    manifest.write_text(json.dumps({"datasets": {"shapes": entry}}))

    args = ["student", "train", str(REPO / "configs" / "variants" / "dcd.yaml")]
    for item in overrides(tiny, setup, tmp_path / "out", f"data.manifest={manifest}"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "built from another dataset" in result.output and str(setup["cache"]) in result.output
    assert not (tmp_path / "out" / "model").exists()


def test_cache_of_another_tokenizer_is_refused_naming_it(tiny, setup, tmp_path):
    from pipeline.text import default_tokenizer_dir

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_tokenizer_dir() / name, folder / name)
    vocab = (default_tokenizer_dir() / "vocab.txt").read_text()
    (folder / "vocab.txt").write_text(vocab.replace("[unused0]", "[unused-other]", 1))

    config = make_config(tiny, setup, tmp_path / "out", f"data.tokenizer={folder}")
    with pytest.raises(CacheError, match="built from another tokenizer"):
        student.run(config)


def test_more_candidates_than_the_cache_holds_is_refused(tiny, setup, tmp_path):
    config = make_config(tiny, setup, tmp_path, f"candidates={GROUP_SIZE + 1}")
    with pytest.raises(CacheError, match=rf"candidates={GROUP_SIZE + 1} .* holds {GROUP_SIZE}"):
        student.run(config)


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["candidates=4", "keep=5"], ["keep (5)", "candidates (4)"]),
        (["loss.alpha=1.5"], ["loss.alpha"]),
        (["loss.alpha=-0.1"], ["loss.alpha"]),
        (["loss.distill=false", "loss.weight_soft=true", "loss.alpha=0"], ["weight_soft"]),
    ],
)
def test_bad_config_is_refused_naming_the_keys(tiny, setup, tmp_path, extra, names):
    with pytest.raises(ConfigError) as error:
        make_config(tiny, setup, tmp_path, *extra)
    for name in names:
        assert name in str(error.value)


# --- divergence -------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tiny, setup, tmp_path, monkeypatch
):
    call = student.StudentLoss.__call__
    calls = []

    def nan_in_epoch_two(self, drawn):
        terms = call(self, drawn)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 2:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(student.StudentLoss, "__call__", nan_in_epoch_two)
    with pytest.raises(
        TrainingError,
        match=rf"non-finite loss nan at step {STEPS_PER_EPOCH + 2}"
        r".*checkpoint.*\(epoch 1\)",
    ):
        student.run(make_config(tiny, setup, tmp_path, "epochs=2"))

    saved = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=False)["state"]
    assert (saved["epoch"], saved["step"]) == (1, STEPS_PER_EPOCH)
    weights = load_model(tmp_path / "checkpoint").state_dict().values()
    assert all(torch.isfinite(tensor).all() for tensor in weights)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "model").exists()


def test_diverging_weights_stop_with_a_training_error(tiny, setup, tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite .* at step \d+; no epoch finished"):
        student.run(make_config(tiny, setup, tmp_path, "lr=1e30", "warmup_steps=0"))
