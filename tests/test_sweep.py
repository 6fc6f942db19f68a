"""`dcd student sweep` (stages/sweep.py) on a tiny cache: results tables, reuse, Ray workers.

.venv/bin/python -m pytest tests/test_sweep.py -x -q            # the slow Ray test included
.venv/bin/python -m pytest tests/test_sweep.py -x -q -m "not slow"
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.models import load_model
from stages import sweep
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
VARIANTS = REPO / "configs" / "variants"


@pytest.fixture(scope="module")
def shared(tiny, tiny_cache) -> list[str]:
    """The sweep's shared overrides: a cache (G = 16, 2 rounds) of a perturbed tiny teacher."""
    root = tiny_cache["cache"].parent
    teacher = tiny_cache["teacher"]
    return [
        *tiny.data_overrides(),
        f"cache={root / 'cache'}",
        f"teacher={teacher}",
        "student_layers=[1]",
        "candidates=16",
        "keep=4",
        "epochs=1",
        "device=cpu",
        "warmup_steps=2",
        "log_every=2",
        "eval_max_images=4",
    ]


def write_sweep(folder: Path, shared: list[str], workers: int) -> Path:
    document = {
        "runs": [
            {"config": str(VARIANTS / "finetune.yaml")},
            {"config": str(VARIANTS / "dcd.yaml")},
        ],
        "seeds": [0],
        "set": shared,
        "out": str(folder / "results"),
        "workers": workers,
        "threads": 1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def invoke(path: Path) -> str:
    result = CliRunner().invoke(app, ["student", "sweep", str(path)])
    assert result.exit_code == 0, result.output
    return result.output


def read_csv(out: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))


def outputs(out: Path) -> dict[Path, int]:
    """mtime (ns) of every run's summary and weights."""
    files = [*out.glob("*/summary.json"), *out.glob("*/model/*.safetensors")]
    return {path: path.stat().st_mtime_ns for path in files}


def test_sweep_writes_results_and_reuses_finished_runs(shared, tmp_path):
    printed = invoke(write_sweep(tmp_path, shared, workers=1))
    out = tmp_path / "results"

    rows = read_csv(out)
    assert [(r["variant"], r["seed"]) for r in rows] == [("finetune", "0"), ("dcd", "0")]
    for row in rows:
        assert {*sweep.METRICS, "train_seconds", "pairs_per_s", "out"} <= set(row)
        summary = json.loads((Path(row["out"]) / "summary.json").read_text())
        for name in sweep.METRICS:  # the run's own test metrics, one column each
            assert float(row[name]) == pytest.approx(summary["test"]["metrics"][name])
        assert summary["variant"] == row["variant"] and summary["steps"] == 4
    assert Path(rows[0]["out"]).name == "finetune-s0"

    markdown = (out / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| variant | seed | tr_r1 |") and len(markdown) == 2 + 2
    assert markdown[2].startswith("| finetune | 0 |") and markdown[3].startswith("| dcd | 0 |")
    assert "| finetune | 0 |" in printed  # the CLI prints the table

    # a rerun trains nothing: summaries and weights are untouched, the tables are the same
    before, tables = outputs(out), [(out / n).read_text() for n in ("results.csv", "results.md")]
    assert len(before) == 4
    invoke(write_sweep(tmp_path, shared, workers=1))
    assert outputs(out) == before
    assert [(out / n).read_text() for n in ("results.csv", "results.md")] == tables


def test_run_configs_per_run_overrides_win_and_seeds_multiply(shared, tmp_path):
    config = sweep.SweepConfig(
        runs=[
            sweep.SweepRun(config=Path("finetune.yaml")),
            sweep.SweepRun(config=Path("dcd.yaml"), name="dcd-long", set=["epochs=3"]),
        ],
        seeds=[0, 5],
        set=[*shared, "epochs=2"],
        out=tmp_path,
    )
    configs = sweep.run_configs(config, base_dir=VARIANTS)  # relative paths from base_dir
    assert [(c.variant, c.seed, c.epochs) for c in configs] == [
        ("finetune", 0, 2),
        ("finetune", 5, 2),
        ("dcd-long", 0, 3),
        ("dcd-long", 5, 3),
    ]
    assert [c.out.name for c in configs] == [
        "finetune-s0",
        "finetune-s5",
        "dcd-long-s0",
        "dcd-long-s5",
    ]
    assert configs[2].loss.weight_hard and not configs[0].loss.distill


@pytest.mark.slow
def test_ray_workers_train_the_same_students(shared, tmp_path):
    """Two runs at once as Ray tasks give the same weights as training in this process."""
    invoke(write_sweep(tmp_path / "ray", shared, workers=2))
    invoke(write_sweep(tmp_path / "local", shared, workers=1))
    rows = {name: read_csv(tmp_path / name / "results") for name in ("ray", "local")}
    assert [r["variant"] for r in rows["ray"]] == ["finetune", "dcd"]
    for ray_row, local_row in zip(rows["ray"], rows["local"]):
        assert [ray_row[m] for m in sweep.METRICS] == [local_row[m] for m in sweep.METRICS]
        a = load_model(Path(ray_row["out"]) / "model").state_dict()
        b = load_model(Path(local_row["out"]) / "model").state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)
