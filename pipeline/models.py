"""The ViLT family: presets, loading local Hugging Face folders, and students built from teachers.

Every model is a `transformers.ViltForImageAndTextRetrieval`, so a saved student or teacher
loads in plain transformers and a local copy of a real ViLT retrieval checkpoint works as a
teacher.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from pydantic import Field
from safetensors import SafetensorError  # a truncated or corrupt weights file
from transformers import ViltConfig, ViltForImageAndTextRetrieval

from pipeline.config import StrictModel
from pipeline.fsio import atomic_path, sha256_file

log = logging.getLogger(__name__)

BERT_VOCAB_SIZE = 30522

# name -> ViltConfig overrides. `shapes` is sized for the embedded benchmark on a 2-core CPU;
# `base` is ViLT-B/32 (the defaults of ViltConfig).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
        max_position_embeddings=40,
    ),
    "shapes": dict(
        hidden_size=64,
        num_hidden_layers=12,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=64,
        patch_size=16,
        max_position_embeddings=40,
    ),
    "base": dict(),
}


class ModelError(ValueError):
    """A model folder or preset that cannot be used; the message says which and why."""


def build_model(
    preset: str, num_layers: int | None = None, seed: int = 0
) -> ViltForImageAndTextRetrieval:
    """A randomly initialised retrieval model from a preset (seeded, so rebuilds are identical)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = dict(PRESETS[preset], vocab_size=BERT_VOCAB_SIZE)
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    torch.manual_seed(seed)
    return ViltForImageAndTextRetrieval(ViltConfig(**overrides)).eval()


def load_model(folder: Path) -> ViltForImageAndTextRetrieval:
    """Load a `save_pretrained` folder from local disk only (safetensors preferred)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a model folder (no config.json); pass a folder written by "
            "save_pretrained, e.g. a teacher from `dcd teacher finetune`"
        )
    has_safetensors = any(folder.glob("*.safetensors"))
    try:
        model = ViltForImageAndTextRetrieval.from_pretrained(
            folder, local_files_only=True, use_safetensors=has_safetensors
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ModelError(f"cannot load model from {folder}: {error}") from error
    return model.eval()


def save_model(model: ViltForImageAndTextRetrieval, folder: Path) -> Path:
    """`save_pretrained` into `folder`, which appears only when complete."""
    with atomic_path(Path(folder)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def default_student_layers(teacher_layers: int, student_layers: int | None = None) -> list[int]:
    """Every other teacher layer, ending with the top one: 12 -> [1, 3, 5, 7, 9, 11]."""
    count = student_layers or max(1, teacher_layers // 2)  # a 1-layer teacher keeps it
    stride = teacher_layers / count
    return [round(teacher_layers - 1 - stride * (count - 1 - i)) for i in range(count)]


def make_student(
    teacher: ViltForImageAndTextRetrieval, layers: list[int] | None = None
) -> ViltForImageAndTextRetrieval:
    """A shallower copy of `teacher`: the chosen encoder layers (0-based, in order), plus the
    embeddings, final layer norm, pooler and ranking head, all copied tensor for tensor."""
    depth = teacher.config.num_hidden_layers
    layers = default_student_layers(depth) if layers is None else list(layers)
    bad = [index for index in layers if not 0 <= index < depth]
    if bad or not layers:
        raise ModelError(f"student layers {layers} must be non-empty indices in [0, {depth})")
    student = _relayered(teacher, layers)
    log.info("student: %d of %d teacher layers %s", len(layers), depth, layers)
    return student.eval()


def _relayered(
    model: ViltForImageAndTextRetrieval, source: list[int]
) -> ViltForImageAndTextRetrieval:
    """A copy whose encoder layer j is `model`'s layer source[j]; every other tensor copied."""
    config = ViltConfig(**{**model.config.to_dict(), "num_hidden_layers": len(source)})
    copy = ViltForImageAndTextRetrieval(config)
    state = model.state_dict()
    mapped = {}
    for name in copy.state_dict():
        key = name
        if ".encoder.layer." in name:
            head, tail = name.split(".encoder.layer.")
            index, rest = tail.split(".", 1)
            key = f"{head}.encoder.layer.{source[int(index)]}.{rest}"
        mapped[name] = state[key].clone()
    copy.load_state_dict(mapped)
    return copy


@torch.no_grad()
def grow_model(model: ViltForImageAndTextRetrieval, depth: int) -> ViltForImageAndTextRetrieval:
    """A deeper copy computing exactly the same function: after each original layer come new
    layers whose residual-branch outputs are zero, so they start as identities and learn from
    there. Evenly interleaved: 6 -> 12 puts one new layer after every original one.

    From-scratch training of the 12-layer shapes teacher sat at the chance loss log(16) for
    300+ steps where a 6-layer model left it after ~225 (measured 2026-12-03, 2-core CPU), so
    the shipped teacher is grown from a trained 6-layer model instead (progressive stacking).
    """
    old = model.config.num_hidden_layers
    if depth <= old:
        raise ModelError(f"grow_to ({depth}) must exceed the model's {old} layers")
    # new layer j copies original layer source[j]; only the first copy keeps its outputs
    source = [i * old // depth for i in range(depth)]
    grown = _relayered(model, source)
    for index, layer in enumerate(grown.vilt.encoder.layer):
        if index > 0 and source[index] == source[index - 1]:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
    log.info("grew %d -> %d layers (new layers start as identities)", old, depth)
    return grown.eval()


def teacher_fingerprint(folder: Path) -> str:
    """sha256 over the teacher's config.json and weight files."""
    files = sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")])
    if not (folder / "config.json").is_file():
        raise ModelError(f"teacher {folder} has no config.json: not a save_pretrained folder")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()[:16]


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ModelConfig(StrictModel):
    """Where a model comes from: a preset (random init) or a local folder, optionally cut down
    to chosen encoder layers (a student)."""

    preset: str | None = "shapes"
    path: Path | None = None  # a save_pretrained folder; wins over `preset`
    num_layers: int | None = Field(default=None, gt=0)  # preset depth override
    student_layers: list[int] | None = None  # keep only these layers (0-based), e.g. [1, 3, 5]
    grow_to: int | None = Field(default=None, gt=0)  # deepen with identity-initialised layers
    seed: int = 0


def build_from_config(config: ModelConfig) -> ViltForImageAndTextRetrieval:
    if config.path is not None:
        model = load_model(config.path)
    elif config.preset is not None:
        model = build_model(config.preset, config.num_layers, config.seed)
    else:
        raise ModelError("model: set `preset` or `path`")
    if config.student_layers is not None:
        model = make_student(model, config.student_layers)
    if config.grow_to is not None:
        model = grow_model(model, config.grow_to)
    return model
