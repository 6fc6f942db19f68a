"""The report: tables with mean ± std, claim verdicts, missing runs, figures, atomic rebuilds.

    python -m pytest tests/test_report.py -x -q

Every expected number is recomputed here with numpy (ddof=1) from the synthetic runs, not taken
from `pipeline.report`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.figures import Stat, make_figures, save_png, separability_curves
from pipeline.report import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    ReportError,
    claims,
    render_markdown,
)
from stages import report as report_stage

SEEDS = (0, 1)
# Seed noise on every recall; asymmetric so the std is not a round number.
JITTER = {0: -0.4, 1: 0.9, 2: 0.2}
GROUPS = {
    "finetune": ["table2"],
    "vanilla_kd": ["table2", "table3"],
    "wsl_kd": ["table2"],
    "student_uncertainty": ["table2"],
    "ds_ka": ["table3"],
    "ds_ka_hw": ["table3"],
    "ds_ka_sw": ["table3"],
    "dcd": ["table2", "table3", "fig3"],
}
# TR R@1 of each variant; the other recalls are offsets from it. Ordered as the paper claims.
BASE = {
    "finetune": 20.0,
    "vanilla_kd": 30.0,
    "wsl_kd": 35.0,
    "student_uncertainty": 10.0,
    "ds_ka": 37.0,
    "ds_ka_hw": 41.0,
    "ds_ka_sw": 40.0,
    "dcd": 45.0,
}
FIG3 = {(16, 16): 30.0, (32, 4): 33.0, (32, 8): 36.0, (64, 4): 39.0, (64, 16): 41.0}
# Final validation gap grows with this; DCD separates best.
SEPARATION = {"vanilla_kd": 1.0, "wsl_kd": 1.5, "dcd": 3.0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics(base: float, seed: int) -> dict[str, float]:
    offsets = {"tr_r1": 0, "tr_r5": 25, "tr_r10": 35, "ir_r1": -8, "ir_r5": 15, "ir_r10": 25}
    values = {key: base + offset + JITTER[seed] for key, offset in offsets.items()}
    return {**values, "rsum": sum(values.values()), "n_images": 100, "n_captions": 500}


def separability(variant: str, seed: int) -> list[dict[str, Any]]:
    slope = SEPARATION.get(variant, 0.5)
    return [
        {
            "event": "epoch",
            "epoch": epoch,
            "step": 10 * epoch,
            "val_positive": 1.0 + 0.5 * slope * epoch + 0.1 * seed,
            "val_top3_negative": 0.5 - 0.5 * slope * epoch,
        }
        for epoch in (1, 2, 3)
    ]


def student(
    name: str,
    variant: str,
    groups: list[str],
    base: float,
    seed: int,
    candidates: int = 64,
    keep: int = 8,
) -> dict[str, Any]:
    test = {
        "metrics": metrics(base, seed),
        "latency_ms_per_pair": 0.2 + 0.01 * seed,
        "parameters": 2_400_000,
        "layers": 6,
    }
    summary = {
        "parameters": 2_400_000,
        "train_seconds": 100.0 + candidates + 10 * keep + seed,
        "pairs_per_s": 900.0,
        "steps": 300,
        "separability": separability(variant, seed),
        "test": test,
    }
    return {
        "name": name,
        "variant": variant,
        "groups": groups,
        "seed": seed,
        "candidates": candidates,
        "keep": keep,
        "summary": summary,
    }


def inspect_rows() -> dict[str, list[dict[str, Any]]]:
    hard = [
        {"direction": d, "candidate_id": i, "times_hard": 50 - i, "label": f"{d} cap|{i}"}
        for d in ("ir", "tr")
        for i in range(20)
    ]
    entropy = [
        {"direction": d, "bin": b, "low": b * 0.1, "high": (b + 1) * 0.1, "queries": 10 + b}
        for d in ("ir", "tr")
        for b in range(20)
    ]
    return {
        "genetic_errors": [
            {"direction": "tr", "queries": 800, "genetic_errors": 96, "share": 0.12}
        ],
        "positive_outside_topk": [
            {"direction": "tr", "queries": 800, "outside_topk": 8, "share": 0.01}
        ],
        "entropy_histogram": entropy,
        "hard_negatives": hard,
        "margins": [
            {"direction": "tr", "queries": 800, "mean": 2.5, "q50": 2.25, "share_negative": 0.12}
        ],
    }


def make_results(
    seeds: tuple[int, ...] = SEEDS,
    base: dict[str, float] | None = None,
    fig3: dict[tuple[int, int], float] | None = None,
) -> dict[str, Any]:
    base = {**BASE, **(base or {})}
    students = [student(v, v, GROUPS[v], base[v], s) for v in GROUPS for s in seeds]
    students += [
        student(f"m{m}_k{k}", "dcd", ["fig3"], r1, s, m, k)
        for (m, k), r1 in {**FIG3, **(fig3 or {})}.items()
        for s in seeds
    ]
    teacher = {
        "metrics": metrics(60.0, 0),
        "parameters": 4_800_000,
        "layers": 12,
        "latency_ms_per_pair": 0.41,
        "separability": {"val_positive": 5.0, "val_top3_negative": -1.0},
    }
    return {
        "command": "dcd run --seeds 2",
        "date": "2026-12-03",
        "profile": "default",
        "seeds": list(seeds),
        "dataset": "shapes",
        "split": "test",
        "teacher": teacher,
        "students": students,
        "inspect": inspect_rows(),
        "timings": {
            "data": 5.0,
            "teacher": 600.0,
            "cache": 60.0,
            "students": 1200.0,
            "report": 2.0,
        },
    }


def expected_cell(values: list[float], digits: int = 1) -> str:
    array = np.asarray(values, dtype=float)
    if len(array) == 1:
        return f"{array.mean():.{digits}f}"
    return f"{array.mean():.{digits}f} ± {array.std(ddof=1):.{digits}f}"


def recalls(results: dict, name: str, key: str) -> list[float]:
    return [r["summary"]["test"]["metrics"][key] for r in results["students"] if r["name"] == name]


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after `heading`: first cell -> the other cells."""
    section = markdown.split(heading, 1)[1]
    lines = [line for line in section.split("\n## ")[0].splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines)}


def claim_verdicts(results: dict) -> dict[str, str]:
    return {claim.key: claim.verdict for claim in claims(results)}


# ----------------------------------------------------------------------------- tables


def test_stat_uses_sample_std() -> None:
    assert Stat((1.0, 2.0, 4.0)).std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert Stat((1.0, 2.0)).text(2) == "1.50 ± 0.71"
    assert Stat((3.0,)).text(1) == "3.0"
    assert Stat(()).text() == "—"


def test_table2_cells_are_mean_and_sample_std() -> None:
    results = make_results()
    rows = table_rows(render_markdown(results), "## Table II analogue")
    # columns: TR R@1, TR R@5, TR R@10, IR R@1, IR R@5, IR R@10, RSUM, Params, ms, Seeds
    assert rows["DCD"][0] == expected_cell(recalls(results, "dcd", "tr_r1"))
    assert rows["WSL KD"][4] == expected_cell(recalls(results, "wsl_kd", "ir_r5"))
    assert rows["Fine-tune"][6] == expected_cell(recalls(results, "finetune", "rsum"))
    assert rows["DCD"][7:] == ["2.40", "0.205 ± 0.007", "2"]
    assert rows["Teacher (12L)"][0] == f"{results['teacher']['metrics']['tr_r1']:.1f}"
    assert rows["Teacher (12L)"][7:] == ["4.80", "0.410", "—"]


def test_table3_and_fig3_tables() -> None:
    results = make_results()
    markdown = render_markdown(results)
    ablation = table_rows(markdown, "## Table III analogue")
    assert list(ablation) == [
        "Model",
        "Vanilla KD",
        "DS&KA",
        "DS&KA + HW",
        "DS&KA + SW",
        "FULL (DCD)",
    ]
    assert ablation["DS&KA + SW"][6] == expected_cell(recalls(results, "ds_ka_sw", "rsum"))
    fig3 = table_rows(markdown, "## Fig. 3 analogue")
    assert list(fig3)[1:] == ["(16, 16)", "(32, 4)", "(32, 8)", "(64, 4)", "(64, 8)", "(64, 16)"]
    assert fig3["(32, 4)"][1] == expected_cell(recalls(results, "m32_k4", "ir_r1"))
    assert fig3["(64, 8)"][0] == expected_cell(recalls(results, "dcd", "tr_r1"))
    assert fig3["(64, 8)"][3] == expected_cell([100.0 + 64 + 80 + s for s in SEEDS])


def test_sections_in_order_and_header_facts() -> None:
    markdown = render_markdown(make_results())
    headings = [
        "# DCD reproduction report",
        "## Table II",
        "## Table III",
        "## Fig. 3",
        "## Fig. 4",
        "## Hard negatives",
        "## Claims",
        "## Timings",
    ]
    positions = [markdown.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert "`dcd run --seeds 2`" in markdown and "2026-12-03" in markdown
    assert "shapes / test (100 images, 500 captions)" in markdown
    assert "- Seeds: 0, 1 (2)" in markdown


def test_inspection_tables_and_timings() -> None:
    markdown = render_markdown(make_results())
    assert markdown.count("tr cap\\|") == 10 and markdown.count("ir cap\\|") == 10
    assert "tr cap\\|9 " in markdown and "tr cap\\|10 " not in markdown
    assert "| tr | 800 | 96 | 12.0% |" in markdown  # genetic errors, share as a percentage
    assert "| tr | 800 | 8 | 1.0% |" in markdown  # positive outside top-K
    timings = table_rows(markdown, "## Timings per stage")
    assert timings["teacher"] == ["600.0", "10.0", f"{600 / 1867:.1%}"]
    assert timings["**total**"][0] == "1867.0"


def test_fig4_final_gaps() -> None:
    markdown = render_markdown(make_results())
    # final epoch 3: positive 1 + 1.5 * slope + 0.1 seed, negatives 0.5 - 1.5 * slope
    gaps = [0.5 + 3.0 * SEPARATION["dcd"] + 0.1 * s for s in SEEDS]
    assert f"- DCD: final gap {expected_cell(gaps, 2)}" in markdown
    assert "- Teacher (reference): gap 6.00" in markdown


def test_fig4_curve_merges_probes_and_epoch_ends() -> None:
    results = make_results()
    for run in results["students"]:
        if run["variant"] == "dcd":
            events = run["summary"]["separability"]
            probes = [
                {
                    "event": "probe",
                    "epoch": e,
                    "step": int(10 * e),
                    "val_positive": 0.0,
                    "val_top3_negative": 0.0,
                }
                for e in (0.0, 0.5, 1.0, 1.5)
            ]
            run["summary"]["separability"] = probes + events
    curve = separability_curves(results)["dcd"]
    assert curve.epochs == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    # at epoch 1 a probe and the epoch end coincide: the epoch end's numbers are kept
    at_one = curve.positive[2].mean
    assert at_one == pytest.approx(1.0 + 0.5 * SEPARATION["dcd"] + 0.1 * sum(SEEDS) / len(SEEDS))
    assert curve.positive[0].mean == 0.0
    markdown = render_markdown(results)
    gaps = [0.5 + 3.0 * SEPARATION["dcd"] + 0.1 * s for s in SEEDS]
    assert f"- DCD: final gap {expected_cell(gaps, 2)}" in markdown


# ----------------------------------------------------------------------------- claims


def test_claims_supported_for_the_paper_ordering() -> None:
    results = make_results()
    assert claim_verdicts(results) == dict.fromkeys("abcd", SUPPORTED)
    claim_lines = render_markdown(results).split("## Claims")[1]
    assert "- (a) DCD > WSL KD > vanilla KD > fine-tune by test RSUM: **supported**." in claim_lines


def test_claims_not_supported_when_reversed() -> None:
    assert claim_verdicts(make_results(base={"wsl_kd": 50.0}))["a"] == NOT_SUPPORTED
    assert claim_verdicts(make_results(base={"ds_ka_hw": 30.0}))["b"] == NOT_SUPPORTED
    assert claim_verdicts(make_results(fig3={(64, 4): 25.0}))["c"] == NOT_SUPPORTED
    reversed_gap = make_results()
    for run in reversed_gap["students"]:
        if run["variant"] == "vanilla_kd":
            run["summary"]["separability"] = separability("dcd", run["seed"] + 5)
    assert claim_verdicts(reversed_gap)["d"] == NOT_SUPPORTED


def test_claim_inconclusive_within_pooled_std() -> None:
    # RSUM differs by 6 * 0.1 = 0.6, the pooled std is 6 * std(JITTER) ≈ 5.5
    verdicts = claim_verdicts(make_results(base={"wsl_kd": BASE["vanilla_kd"] + 0.1}))
    assert verdicts["a"] == INCONCLUSIVE
    assert verdicts["b"] == SUPPORTED


def test_claims_inconclusive_with_one_seed() -> None:
    results = make_results(seeds=(0,))
    assert claim_verdicts(results) == dict.fromkeys("abcd", INCONCLUSIVE)
    assert "means in the claimed order" in claims(results)[0].evidence
    swapped = claims(make_results(seeds=(0,), base={"wsl_kd": 50.0}))[0]
    assert swapped.verdict == INCONCLUSIVE and "out of order: DCD ≤ WSL KD" in swapped.evidence
    rows = table_rows(render_markdown(results), "## Table II analogue")
    assert rows["DCD"][0] == f"{BASE['dcd'] + JITTER[0]:.1f}" and rows["DCD"][-1] == "1"


def test_missing_variants_are_named_not_fatal() -> None:
    results = make_results()
    results["students"] = [
        r for r in results["students"] if r["variant"] != "wsl_kd" and "fig3" not in r["groups"]
    ]
    markdown = render_markdown(results)
    by_key = {claim.key: claim for claim in claims(results)}
    assert by_key["a"].verdict == INCONCLUSIVE and "WSL KD" in by_key["a"].evidence
    assert by_key["c"].verdict == INCONCLUSIVE and "present: none" in by_key["c"].evidence
    assert by_key["d"].verdict == INCONCLUSIVE and "WSL KD" in by_key["d"].evidence
    assert by_key["b"].verdict == INCONCLUSIVE  # FULL (DCD) left with the fig3 group
    assert "Not run: WSL KD, DCD." in markdown and "*No Fig. 3 runs.*" in markdown


def test_empty_results_still_render() -> None:
    markdown = render_markdown({})
    assert "## Claims" in markdown and "*No inspection results.*" in markdown
    assert "figures/" not in markdown
    assert claim_verdicts({}) == dict.fromkeys("abcd", INCONCLUSIVE)


# ----------------------------------------------------------------------------- stage, figures


def write_results(run_dir: Path, results: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # sorted keys, as `dcd run` writes it (pipeline.fsio.write_json)
    (run_dir / "results.json").write_text(json.dumps(results, sort_keys=True))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200


def test_stage_writes_report_and_valid_figures(tmp_path: Path) -> None:
    results = make_results()
    write_results(tmp_path, results)
    report = report_stage.run(tmp_path)
    assert report == tmp_path / "report.md"
    for name in ("fig3.png", "fig4.png", "entropy.png"):
        assert_png(tmp_path / "figures" / name)
        assert f"(figures/{name})" in report.read_text()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    # pipeline order survives the sorted keys of results.json; direction leads, label closes
    markdown = report.read_text()
    assert list(table_rows(markdown, "## Timings")) == ["Stage", *results["timings"], "**total**"]
    assert "| direction | candidate_id | times_hard | label |" in markdown
    assert markdown.index("### Genetic errors") < markdown.index("### Positive outside")


def test_rebuild_gives_identical_files(tmp_path: Path) -> None:
    write_results(tmp_path, make_results())
    first = report_stage.run(tmp_path).read_text()
    pngs = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    assert report_stage.run(tmp_path).read_text() == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()} == pngs


def test_report_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_results(tmp_path, make_results())
    report = report_stage.run(tmp_path)
    before = report.read_text()

    def half_then_fail(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    write_results(tmp_path, make_results(base={"dcd": 10.0}))
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        report_stage.run(tmp_path)
    monkeypatch.undo()
    assert report.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "report.md",
        "results.json",
    ]


def test_stale_figure_removed_when_data_is_gone(tmp_path: Path) -> None:
    write_results(tmp_path, make_results())
    report_stage.run(tmp_path)
    results = make_results()
    del results["inspect"]
    write_results(tmp_path, results)
    markdown = report_stage.run(tmp_path).read_text()
    assert not (tmp_path / "figures" / "entropy.png").exists()
    assert (tmp_path / "figures" / "fig3.png").exists() and "entropy.png" not in markdown


def test_bad_results_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="results.json: not found"):
        report_stage.run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match="results.json: not valid JSON"):
        report_stage.run(tmp_path)


def test_figures_are_pure_and_saveable(tmp_path: Path) -> None:
    results = make_results()
    snapshot = copy.deepcopy(results)
    figures = make_figures(results)
    assert set(figures) == {"fig3", "fig4", "entropy"} and results == snapshot
    save_png(figures["fig4"], tmp_path / "fig4.png")
    assert_png(tmp_path / "fig4.png")
    assert make_figures({"students": []}) == {}


def test_minimal_pairs_table_averages_both_directions_over_seeds() -> None:
    results = make_results()
    shares = {"colour": (1.0, 0.9), "relation_flip": (0.5, 0.4)}
    results["teacher"]["minimal_pairs"] = {
        change: {"images": 10, "tr": tr, "ir": ir} for change, (tr, ir) in shares.items()
    } | {"all": {"images": 20, "tr": 0.75, "ir": 0.65}}
    dcd_runs = [r for r in results["students"] if r["name"] == "dcd"]
    for offset, run in enumerate(dcd_runs):
        run["summary"]["test"]["minimal_pairs"] = {
            "colour": {"images": 10, "tr": 0.8 + offset / 10, "ir": 0.8},
            "all": {"images": 10, "tr": 0.8 + offset / 10, "ir": 0.8},
        }
    markdown = render_markdown(results)
    assert markdown.index("## Fig. 4") < markdown.index("## Minimal pairs")
    assert markdown.index("## Minimal pairs") < markdown.index("## Hard negatives")
    rows = table_rows(markdown, "## Minimal pairs")
    assert rows["Model"] == ["colour", "relation flip", "all"]
    assert rows["Teacher (12L)"] == ["0.95", "0.45", "0.70"]
    dcd_values = [0.8 + offset / 20 for offset in range(len(dcd_runs))]
    assert rows["DCD"] == [expected_cell(dcd_values, 2), "—", expected_cell(dcd_values, 2)]
    assert rows["Fine-tune"] == ["—", "—", "—"]


def test_no_minimal_pairs_section_without_twins() -> None:
    assert "## Minimal pairs" not in render_markdown(make_results())
