"""Model presets, students copied from teacher layers, and Hugging Face folders on disk."""

from __future__ import annotations

import pytest
import torch
from transformers import ViltForImageAndTextRetrieval

from pipeline.models import (
    ModelConfig,
    ModelError,
    build_from_config,
    build_model,
    default_student_layers,
    load_model,
    make_student,
    save_model,
)


@pytest.fixture(scope="module")
def teacher() -> ViltForImageAndTextRetrieval:
    """A 12-layer `tiny` model whose tensors all differ, so a wrong copy cannot pass by chance."""
    model = build_model("tiny", num_layers=12, seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 3000, (batch, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, 7, dtype=torch.long),
        "pixel_values": torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1,
        "pixel_mask": torch.ones(batch, 32, 32, dtype=torch.long),
    }


@torch.no_grad()
def logits(model: ViltForImageAndTextRetrieval, batch: dict) -> torch.Tensor:
    torch.manual_seed(0)  # transformers draws a random patch order in every forward
    return model(**batch).logits


def layer_tensors(model: ViltForImageAndTextRetrieval, index: int) -> dict[str, torch.Tensor]:
    return dict(model.vilt.encoder.layer[index].state_dict())


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [
        (12, None, [1, 3, 5, 7, 9, 11]),
        (12, 3, [3, 7, 11]),
        (12, 4, [2, 5, 8, 11]),
        (12, 12, list(range(12))),
        (6, None, [1, 3, 5]),
        (3, None, [2]),
        (1, None, [0]),
    ],
)
def test_default_student_layers(teacher_layers, student_layers, expected):
    assert default_student_layers(teacher_layers, student_layers) == expected


@pytest.mark.parametrize("layers", [[1, 3, 5, 7, 9, 11], [0, 11], [4], [7, 2]])
def test_student_copies_exactly_the_chosen_layers(teacher, layers):
    student = make_student(teacher, layers)
    assert student.config.num_hidden_layers == len(layers)
    assert len(student.vilt.encoder.layer) == len(layers)
    for k, source in enumerate(layers):
        mine, theirs = layer_tensors(student, k), layer_tensors(teacher, source)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"student layer {k}.{name}"

    # everything outside the encoder layers is copied too: embeddings, final norm, pooler, head
    teacher_state = teacher.state_dict()
    outside = [name for name in student.state_dict() if ".encoder.layer." not in name]
    assert any(name.startswith("vilt.embeddings.") for name in outside)
    assert {
        "rank_output.weight",
        "rank_output.bias",
        "vilt.pooler.dense.weight",
        "vilt.layernorm.weight",
    } <= set(outside)
    for name in outside:
        assert torch.equal(student.state_dict()[name], teacher_state[name]), name


def test_student_defaults_to_every_other_layer(teacher):
    student = make_student(teacher)
    assert student.config.num_hidden_layers == 6
    assert torch.equal(
        student.vilt.encoder.layer[0].output.dense.weight,
        teacher.vilt.encoder.layer[1].output.dense.weight,
    )
    assert torch.equal(
        student.vilt.encoder.layer[5].output.dense.weight,
        teacher.vilt.encoder.layer[11].output.dense.weight,
    )
    assert not student.training


def test_student_of_all_layers_computes_what_the_teacher_computes(teacher):
    batch = inputs()
    assert torch.equal(
        logits(make_student(teacher, list(range(12))), batch), logits(teacher, batch)
    )


def test_student_copy_does_not_share_storage(teacher):
    student = make_student(teacher, [0])
    with torch.no_grad():
        student.vilt.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(
        student.vilt.encoder.layer[0].output.dense.weight,
        teacher.vilt.encoder.layer[0].output.dense.weight,
    )


@pytest.mark.parametrize("layers", [[12], [-1], [], [0, 12], [3, 99]])
def test_bad_student_layers_are_an_error(teacher, layers):
    with pytest.raises(ModelError, match=r"student layers .* in \[0, 12\)"):
        make_student(teacher, layers)


def test_saved_model_loads_in_plain_transformers_with_identical_outputs(teacher, tmp_path):
    student = make_student(teacher, [2, 9])
    folder = save_model(student, tmp_path / "student")
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    plain = ViltForImageAndTextRetrieval.from_pretrained(folder).eval()
    assert plain.config.num_hidden_layers == 2
    saved = student.state_dict()
    assert plain.state_dict().keys() == saved.keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    # identical weights; the (32 -> 1) head's BLAS kernel may round the last bit differently for
    # tensors read from a file (measured: 1.9e-9 on logits of 1e-2), so outputs get a hair of slack
    batch = inputs()
    expected = logits(student, batch)
    torch.testing.assert_close(logits(plain, batch), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(logits(load_model(folder), batch), expected, rtol=0, atol=1e-7)


def test_save_replaces_an_existing_folder(tmp_path):
    save_model(build_model("tiny", seed=0), tmp_path / "m")
    second = build_model("tiny", seed=5)
    save_model(second, tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").rank_output.weight, second.rank_output.weight)


def test_load_model_without_config_names_the_folder(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=f"{folder} is not a model folder"):
        load_model(folder)


def test_load_model_with_corrupt_weights_is_a_model_error(tmp_path):
    folder = save_model(build_model("tiny"), tmp_path / "m")
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot load model from"):
        load_model(folder)


def test_build_model_is_seeded_and_checks_the_preset():
    first, again = build_model("tiny", seed=3), build_model("tiny", seed=3)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(build_model("tiny", seed=4).rank_output.weight, first.rank_output.weight)
    with pytest.raises(ModelError, match="unknown model preset 'huge'"):
        build_model("huge")


def test_config_builds_a_student_from_a_folder(teacher, tmp_path):
    folder = save_model(teacher, tmp_path / "teacher")
    student = build_from_config(ModelConfig(path=folder, student_layers=[0, 5]))
    assert student.config.num_hidden_layers == 2
    assert torch.equal(
        student.vilt.encoder.layer[1].attention.output.dense.weight,
        teacher.vilt.encoder.layer[5].attention.output.dense.weight,
    )
    with pytest.raises(ModelError, match="set `preset` or `path`"):
        build_from_config(ModelConfig(preset=None))
