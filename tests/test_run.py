"""The main job end to end: `dcd run --quick` on the shapes benchmark with the shipped teacher.

Slow (about 3 minutes on 2 cores); CI runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the shipped teacher, configs and data manifest live here
    out = tmp_path / "quick"
    result = CliRunner().invoke(app, ["run", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    names = {run["name"] for run in results["students"]}
    assert {"finetune", "vanilla_kd", "dcd", "m32_k4"} <= names
    for run in results["students"]:
        metrics = run["summary"]["test"]["metrics"]
        assert 0 <= metrics["tr_r1"] <= 100 and metrics["n_images"] == 20
    assert results["inspect"]["genetic_errors"]
    report = (out / "report.md").read_text()
    assert "Table II" in report and "Table III" in report
    assert (out / "figures" / "fig3.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun reuses every stage: no student retrains, the cache is not rewritten
    summaries = sorted(out.glob("students/*/summary.json"))
    stamps = [path.stat().st_mtime_ns for path in summaries]
    again = CliRunner().invoke(app, ["run", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert [path.stat().st_mtime_ns for path in summaries] == stamps
