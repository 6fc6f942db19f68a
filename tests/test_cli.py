"""The `dcd` command end to end through typer's CliRunner, on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from stages.cli import app, run_command

runner = CliRunner()


def dcd(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def assert_clean_user_error(result, *fragments: str) -> None:
    """Exit status 2, the fragments in the message, and no Python traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def with_sets(*overrides: str) -> list[str]:
    return [part for item in overrides for part in ("--set", item)]


def test_data_shapes_writes_the_dataset(tmp_path):
    out = tmp_path / "s"
    result = dcd(*f"data shapes --out {out} --train 8 --val 4 --test 4 --image-size 16".split())
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 's' / 'dataset.json'} (16 images)" in result.output
    rows = json.loads((tmp_path / "s" / "dataset.json").read_text())["images"]
    assert [row["split"] for row in rows].count("val") == 4 and len(rows) == 16
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 16


@pytest.mark.parametrize("option", ["--train", "--val", "--test"])
@pytest.mark.parametrize("count", [7, 0])
def test_data_shapes_rejects_odd_or_empty_counts(tmp_path, option, count):
    result = dcd("data", "shapes", "--out", tmp_path / "s", option, count)
    assert result.exit_code == 2
    assert f"{option} must be an even number >= 2" in result.output
    assert not (tmp_path / "s").exists()


def shapes_with_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """A small shapes dataset written by the CLI and a manifest naming it `mini`."""
    out = tmp_path / "s"
    result = dcd(*f"data shapes --out {out} --train 4 --val 2 --test 2 --image-size 16".split())
    assert result.exit_code == 0, result.output
    json_path = tmp_path / "s" / "dataset.json"
    manifest = tmp_path / "manifest.yaml"
    entry = {
        "kind": "generated",
        "json_path": str(json_path),
        "image_root": str(tmp_path / "s" / "images"),
        "splits": {"train": 4, "val": 2, "test": 2},
        "captions_per_image": 5,
    }
    manifest.write_text(yaml.safe_dump({"datasets": {"mini": entry}}))
    return json_path, manifest


def test_data_check_passes_a_good_dataset(tmp_path):
    _, manifest = shapes_with_manifest(tmp_path)
    result = dcd("data", "check", "mini", "--manifest", manifest)
    assert result.exit_code == 0, result.output
    assert "OK: no problems" in result.output


def test_data_check_reports_every_problem_of_a_broken_dataset(tmp_path):
    json_path, manifest = shapes_with_manifest(tmp_path)
    document = json.loads(json_path.read_text())
    document["images"][1]["sentences"][2]["raw"] = "   "
    document["images"][3]["sentences"] = document["images"][3]["sentences"][:2]
    json_path.write_text(json.dumps(document))
    (json_path.parent / "images" / "000005.png").unlink()
    (json_path.parent / "images" / "000006.png").write_bytes(b"not a png")

    result = dcd("data", "check", "mini", "--manifest", manifest)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for kind in ("empty_caption", "few_captions", "missing_image", "corrupt_image"):
        assert kind in result.output, (kind, result.output)
    assert "000005.png" in result.output and "000006.png" in result.output


def test_data_check_unknown_name_is_a_clean_error(tmp_path):
    _, manifest = shapes_with_manifest(tmp_path)
    assert_clean_user_error(dcd("data", "check", "nosuch", "--manifest", manifest), "nosuch")


@pytest.fixture(scope="module")
def finetuned(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-finetune")
    result = dcd(
        "teacher",
        "finetune",
        "--out",
        out,
        *with_sets(
            *tiny.data_overrides(),
            f"model.path={tiny.model_dir}",
            "epochs=1",
            "group_size=8",
            "threads=1",
            "device=cpu",
        ),
    )
    return out, result


def test_teacher_finetune_on_tiny_data(finetuned):
    out, result = finetuned
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 8 and summary["model"] == str(out / "model")
    assert (out / "model" / "config.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["out"] == str(out)


def test_evaluate_prints_the_table(finetuned, tiny, tmp_path):
    out, _ = finetuned
    result = dcd(
        "evaluate",
        out / "model",
        "--out",
        tmp_path / "eval",
        *with_sets(*tiny.data_overrides(), "threads=1", "device=cpu"),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # progress bars go to stderr
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    )
    assert lines[header + 1].startswith("TR") and lines[header + 2].startswith("IR")
    assert "1280 pairs" in result.output
    assert f"metrics: {tmp_path / 'eval' / 'metrics.json'}" in result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == str(
        out / "model"
    )


@pytest.mark.parametrize(
    ("command", "key"),
    [
        (["teacher", "finetune"], "data.bogus"),
        (["teacher", "finetune"], "epochz"),
        (["evaluate", "somewhere"], "data.image_sise"),
    ],
)
def test_bad_set_key_exits_2_naming_the_key(tmp_path, command, key):
    result = dcd(*command, "--out", tmp_path, "--set", f"{key}=1")
    assert_clean_user_error(result, f"unknown key '{key}'")


def test_bad_set_value_exits_2_naming_the_key(tmp_path):
    result = dcd("teacher", "finetune", "--out", tmp_path, "--set", "epochs=-3")
    assert_clean_user_error(result, "epochs")


def test_missing_model_folder_is_a_clean_error(tiny, tmp_path):
    result = dcd(
        "evaluate",
        tmp_path / "no-model",
        "--out",
        tmp_path / "eval",
        *with_sets(*tiny.data_overrides(), "threads=1"),
    )
    assert_clean_user_error(result, f"{tmp_path / 'no-model'} is not a model folder")


def command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group below `command` (typer vendors its own click classes)."""
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*prefix, name))
    return paths


def test_help_works_for_every_command():
    paths = command_paths(typer.main.get_command(app))
    expected = {("data", "shapes"), ("data", "check"), ("teacher", "finetune"), ("evaluate",)}
    assert expected <= set(paths)
    for path in paths:
        result = dcd(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output, path


def test_run_command_names_every_choice_that_shapes_the_report():
    assert run_command(None, False, None, None) == "dcd run"
    assert (
        run_command(Path("configs/run.yaml"), True, 3, ["profile=long", "workers=1"])
        == "dcd run configs/run.yaml --quick --seeds 3 --set profile=long --set workers=1"
    )


def test_run_profiles_long_trains_four_epochs_on_four_rounds():
    from pipeline.config import load_config
    from stages.run import PROFILES, RunConfig

    config = load_config(RunConfig, None, ["profile=long"])
    long = PROFILES[config.profile]
    assert (long.student_epochs, long.cache_rounds) == (4, 4)
    assert long.eval_max_images == PROFILES["default"].eval_max_images
