"""Config loading: precedence, `extends`, error messages, resolved-config round trip, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, ValidationError, model_validator

from pipeline.config import (
    ConfigError,
    NonNegativeInt,
    PositiveInt,
    Probability,
    StrictModel,
    config_hash,
    load_config,
    parse_overrides,
    save_resolved,
)


class Optim(StrictModel):
    lr: float = 1e-3
    alpha: Probability = 0.5


class Select(StrictModel):
    # Paper symbols: M = candidates per query, M' = keep (hard negatives retained).
    candidates: PositiveInt = 64
    keep: PositiveInt = 16

    @model_validator(mode="after")
    def _keep_below_candidates(self) -> Select:
        if self.keep >= self.candidates:
            raise ValueError(
                f"keep ({self.keep}) must be smaller than candidates ({self.candidates})"
            )
        return self


class TrainConfig(StrictModel):
    name: str = "run"
    batch_size: PositiveInt = 32
    workers: NonNegativeInt = 0
    optim: Optim = Field(default_factory=Optim)
    select: Select = Field(default_factory=Select)
    stages: list[Optim] = Field(default_factory=list)
    tags: dict[str, int] = Field(default_factory=dict)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_only():
    config = load_config(TrainConfig)
    assert config == TrainConfig()
    assert (config.batch_size, config.optim.alpha, config.select.keep) == (32, 0.5, 16)


def test_precedence_base_then_file_then_overrides(tmp_path):
    path = write(tmp_path / "run.yaml", "batch_size: 16\nname: file\noptim:\n  lr: 1e-4\n")
    config = load_config(
        TrainConfig, path, ["batch_size=64"], base={"name": "base", "workers": 3, "batch_size": 8}
    )
    assert config.batch_size == 64  # override beats file beats base
    assert config.name == "file"
    assert config.workers == 3  # only base sets it
    assert config.optim.lr == pytest.approx(1e-4)  # `1e-4` read as a float, not a string
    assert config.optim.alpha == 0.5  # sibling of a file key keeps its default


def test_nested_override_keeps_siblings(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr: 0.01\n  alpha: 0.9\n")
    config = load_config(TrainConfig, path, ["optim.alpha=0.25", "select.keep=4"])
    assert config.optim == Optim(lr=0.01, alpha=0.25)
    assert config.select == Select(candidates=64, keep=4)


def test_parse_overrides_values():
    parsed = parse_overrides(["a.b.c=3", "a.b.d=[1, 2]", "a.e=true", "f=x", "g=1e-4", "h=a=b"])
    assert parsed == {
        "a": {"b": {"c": 3, "d": [1, 2]}, "e": True},
        "f": "x",
        "g": 1e-4,
        "h": "a=b",
    }


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3"])
def test_malformed_override_is_named(bad):
    with pytest.raises(ConfigError, match="--set override") as err:
        load_config(TrainConfig, overrides=[bad])
    assert repr(bad) in str(err.value)


def test_extends_chain_relative_to_including_file(tmp_path):
    write(tmp_path / "base.yaml", "name: base\nbatch_size: 8\noptim:\n  lr: 0.1\n  alpha: 0.1\n")
    variants = tmp_path / "variants"
    write(variants / "mid.yaml", "extends: ../base.yaml\nbatch_size: 16\noptim:\n  lr: 0.2\n")
    top = write(variants / "top.yaml", "extends: mid.yaml\noptim:\n  alpha: 0.3\n")
    config = load_config(TrainConfig, top)
    assert (config.name, config.batch_size) == ("base", 16)
    assert config.optim == Optim(lr=0.2, alpha=0.3)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(TrainConfig, tmp_path / "a.yaml")
    assert "a.yaml" in str(err.value) and "b.yaml" in str(err.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", "extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone\.yaml \(extended from .*child\.yaml\)"):
        load_config(TrainConfig, child)


def test_unknown_top_level_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path / "run.yaml", "batch_sise: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert f"{path}: unknown key 'batch_sise'" in message
    assert "did you mean 'batch_size'?" in message
    assert "valid keys at top level: name, batch_size, workers" in message


def test_unknown_nested_key_from_override_names_dotted_key(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path, ["optim.alhpa=0.1"])
    message = str(err.value)
    assert "--set override 'optim.alhpa=0.1'" in message
    assert "unknown key 'optim.alhpa'; valid keys under 'optim': lr, alpha" in message
    assert "did you mean 'alpha'?" in message


def test_unknown_key_inside_list_item_lists_item_fields():
    with pytest.raises(ConfigError, match=r"'stages\.1\.lrr'.*under 'stages\.1': lr, alpha"):
        load_config(TrainConfig, base={"stages": [{"lr": 1.0}, {"lrr": 2.0}]})


def test_every_bad_value_is_listed_with_key_and_value(tmp_path):
    path = write(tmp_path / "run.yaml", "batch_size: -1\nworkers: -2\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    lines = str(err.value).splitlines()
    assert "2 error(s)" in lines[0]
    assert f"{path}: batch_size: Input should be greater than 0 (got -1)" in lines[1]
    assert f"{path}: workers: Input should be greater than or equal to 0 (got -2)" in lines[2]


@pytest.mark.parametrize("alpha", ["1.5", "-0.1"])
def test_alpha_outside_unit_interval_names_alpha(alpha):
    with pytest.raises(ConfigError, match=rf"optim\.alpha: .* \(got {alpha}\)"):
        load_config(TrainConfig, overrides=[f"optim.alpha={alpha}"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"batch_size: .*integer.* \(got 'lots'\)"):
        load_config(TrainConfig, overrides=["batch_size=lots"])


def test_keep_not_below_candidates_rejected_naming_both(tmp_path):
    path = write(tmp_path / "run.yaml", "select:\n  candidates: 8\n  keep: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert f"{path}: select: Value error, keep (8) must be smaller than candidates (8)" in str(
        err.value
    )
    # validate_assignment keeps the rule after loading too.
    config = load_config(TrainConfig)
    with pytest.raises(ValidationError, match="keep"):
        config.select.keep = 64


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: ok\noptim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: YAML syntax error"):
        load_config(TrainConfig, path)


def test_non_mapping_file_rejected(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, path)


def test_save_resolved_round_trips_with_defaults_filled(tmp_path):
    config = load_config(
        TrainConfig, overrides=["optim.lr=3e-5", "stages=[{alpha: 0.2}]", "tags={b: 2, a: 1}"]
    )
    saved = save_resolved(config, tmp_path / "out")
    assert saved == tmp_path / "out" / "config.yaml"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["config.yaml"]  # no temp files
    text = saved.read_text()
    assert "workers: 0" in text and config_hash(config) in text
    assert load_config(TrainConfig, saved) == config


def test_config_hash_ignores_key_order_and_tracks_values(tmp_path):
    one = write(tmp_path / "one.yaml", "batch_size: 4\ntags: {a: 1, b: 2}\noptim: {lr: 0.1}\n")
    two = write(tmp_path / "two.yaml", "optim: {lr: 0.1}\ntags: {b: 2, a: 1}\nbatch_size: 4\n")
    first, second = load_config(TrainConfig, one), load_config(TrainConfig, two)
    assert list(first.tags) != list(second.tags)  # dict field keeps insertion order...
    assert config_hash(first) == config_hash(second)  # ...but the hash does not see it

    digest = config_hash(first)
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert config_hash(first.model_copy(update={"batch_size": 5})) != digest
    assert config_hash(first, "stage=cache") != digest
    # Pinned: a change here silently invalidates every cache keyed by config_hash.
    assert config_hash(TrainConfig()) == "e3a39e6760cf"
