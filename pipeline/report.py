"""The reproduction report: `dcd run`'s results.json -> markdown text, as pure functions.

    python -c "import json; from pipeline.report import render_markdown;
    print(render_markdown(json.load(open('runs/run/results.json'))))"

Sections follow the paper (Rao et al., IEEE TMM 2023): Tables II and III, Figs. 3 and 4, then
the cache inspection, the four claims and the stage timings. A number over seeds is
"mean ± sample std" (ddof=1), the plain mean for one seed. The per-seed series and the PNGs
come from `pipeline.figures`; the markdown links only the figures it says are drawn.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from pipeline.figures import (
    FIG4_VARIANTS,
    FIGURE_FILES,
    FIGURES_DIR,
    Curve,
    Fig3Point,
    Results,
    Run,
    Stat,
    available_figures,
    bin_edges,
    entropy_rows,
    fig3_points,
    lookup,
    runs_for,
    separability_curves,
    stat,
)

RECALL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
RECALL_HEADERS = ("TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10", "RSUM")
TABLE2 = {"finetune": "Fine-tune", "vanilla_kd": "Vanilla KD", "wsl_kd": "WSL KD",
          "student_uncertainty": "Student uncertainty", "dcd": "DCD"}  # fmt: skip
TABLE3 = {"vanilla_kd": "Vanilla KD", "ds_ka": "DS&KA", "ds_ka_hw": "DS&KA + HW",
          "ds_ka_sw": "DS&KA + SW", "dcd": "FULL (DCD)"}  # fmt: skip
INSPECT_TITLES = {  # in report order
    "genetic_errors": "Genetic errors: the teacher ranks a negative above the positive",
    "positive_outside_topk": "Positive outside the teacher's top M'+1 (KA pulls it back in)",
    "entropy_histogram": "Teacher entropy over the kept M'+1 candidates",
    "hard_negatives": "Most often mined hard negatives (top 10 per direction)",
    "margins": "Teacher margin: positive logit minus the best negative logit",
}
INSPECT_INTRO = (
    "Direction tr: image queries over caption candidates; ir: caption queries over image"
    " candidates. Entropy is the teacher's, over the kept M'+1 candidates."
)
STAGE_ORDER = ("data", "teacher", "cache", "students", "report")
HARD_NEGATIVES_SHOWN = 10
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


class ReportError(ValueError):
    """results.json is missing or not what `dcd run` writes."""


# ----------------------------------------------------------------------------- tables


def _record(run: Run) -> dict[str, Any]:
    """A student run in the teacher's shape: metrics, parameters, latency_ms_per_pair."""
    summary = run.get("summary") or {}
    test = summary.get("test") or {}
    return {"metrics": test.get("metrics") or {},
            "parameters": test.get("parameters", summary.get("parameters")),
            "latency_ms_per_pair": test.get("latency_ms_per_pair")}  # fmt: skip


def metric_row(records: list[dict[str, Any]]) -> dict[str, Stat]:
    """Recall columns, parameters (millions) and per-pair latency (ms) over the records."""
    row = {key: stat(lookup(r, "metrics", key) for r in records) for key in RECALL_KEYS}
    millions = (r.get("parameters") for r in records)
    row["parameters"] = stat(None if p is None else p / 1e6 for p in millions)
    row["latency"] = stat(r.get("latency_ms_per_pair") for r in records)
    return row


def variant_row(results: Results, variant: str, group: str) -> dict[str, Stat]:
    return metric_row([_record(run) for run in runs_for(results, variant, group)])


# ----------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """One paper claim checked against the runs: verdict is SUPPORTED, NOT_SUPPORTED or
    INCONCLUSIVE (missing runs, one seed, or a difference within one pooled std)."""

    key: str
    statement: str
    verdict: str
    evidence: str

    def text(self) -> str:
        return f"- ({self.key}) {self.statement}: **{self.verdict}**. {self.evidence}"


def pooled_std(first: Stat, second: Stat) -> float:
    """sqrt(((n1-1)s1² + (n2-1)s2²) / (n1+n2-2)), both with at least two values."""
    spread = (first.n - 1) * first.std**2 + (second.n - 1) * second.std**2
    return math.sqrt(spread / (first.n + second.n - 2))


def judge(
    key: str, statement: str, stats: dict[str, Stat], pairs: list[tuple[str, str]], digits: int = 1
) -> Claim:
    """Each (higher, lower) pair of labels in `stats` must differ by more than a pooled std."""
    missing = [label for label, value in stats.items() if value.n == 0]
    if missing or not pairs:
        what = ", ".join(missing) or "nothing to compare"
        return Claim(key, statement, INCONCLUSIVE, f"Cannot be tested, no results for: {what}.")
    values = "; ".join(f"{label} {value.text(digits)}" for label, value in stats.items())
    if any(value.n < 2 for value in stats.values()):
        wrong = ", ".join(f"{a} ≤ {b}" for a, b in pairs if stats[a].mean <= stats[b].mean)
        order = f"means out of order: {wrong}" if wrong else "means in the claimed order"
        return Claim(key, statement, INCONCLUSIVE, f"{values}; {order} (one seed, no spread).")
    # (higher - lower, pooled std) per pair
    gaps = {(a, b): (stats[a].mean - stats[b].mean, pooled_std(stats[a], stats[b]))
            for a, b in pairs}  # fmt: skip
    reversed_ = [pair for pair, (gap, std) in gaps.items() if gap < -std]
    ties = [pair for pair, (gap, std) in gaps.items() if abs(gap) <= std]
    verdict = NOT_SUPPORTED if reversed_ else INCONCLUSIVE if ties else SUPPORTED
    notes = [
        f"{a} − {b} = {gaps[a, b][0]:+.{digits}f} (pooled std {gaps[a, b][1]:.{digits}f})"
        for a, b in reversed_ + ties
    ]
    detail = "; ".join(notes) if notes else "each expected difference exceeds one pooled std"
    return Claim(key, statement, verdict, f"{values}; {detail}.")


def claim_a(results: Results) -> Claim:
    order = ["dcd", "wsl_kd", "vanilla_kd", "finetune"]
    stats = {TABLE2[v]: variant_row(results, v, "table2")["rsum"] for v in order}
    statement = "DCD > WSL KD > vanilla KD > fine-tune by test RSUM"
    return judge("a", statement, stats, list(pairwise(stats)))


def claim_b(results: Results) -> Claim:
    stats = {TABLE3[v]: variant_row(results, v, "table3")["rsum"] for v in TABLE3}
    vanilla, ds_ka, hw, sw, full = stats
    pairs = [(ds_ka, vanilla), (hw, ds_ka), (sw, ds_ka), (full, hw), (full, sw)]
    statement = "each ablation step helps (vanilla KD < DS&KA < +HW / +SW < FULL) by test RSUM"
    return judge("b", statement, stats, pairs)


def claim_c(results: Results) -> Claim:
    by_keep: dict[int, list[Fig3Point]] = {}
    for point in sorted(fig3_points(results), key=lambda p: (p.keep, p.candidates)):
        by_keep.setdefault(point.keep, []).append(point)
    pairs = [(high, low) for same in by_keep.values() for low, high in pairwise(same)]
    statement = "a larger M helps at equal M'+1, by test RSUM"
    if not pairs:
        present = ", ".join(p.label for p in fig3_points(results)) or "none"
        evidence = f"Needs two Fig. 3 points with the same M'+1; present: {present}."
        return Claim("c", statement, INCONCLUSIVE, evidence)
    stats = {p.label: p.metric("rsum") for pair in pairs for p in reversed(pair)}
    return judge("c", statement, stats, [(high.label, low.label) for high, low in pairs])


def claim_d(results: Results) -> Claim:
    curves = separability_curves(results)
    stats = {
        label: curves[v].final_gap if v in curves else Stat(())
        for v, label in FIG4_VARIANTS.items()
    }
    statement = (
        "DCD separates negatives better: its final validation gap (positive minus top-3"
        " negatives) exceeds vanilla KD's and WSL KD's"
    )
    return judge("d", statement, stats, [("DCD", "Vanilla KD"), ("DCD", "WSL KD")], digits=2)


def claims(results: Results) -> list[Claim]:
    return [claim(results) for claim in (claim_a, claim_b, claim_c, claim_d)]


# ----------------------------------------------------------------------------- markdown


def md_table(header: list[str], rows: list[list[str]], left: set[int] | None = None) -> str:
    """A GitHub markdown table; columns in `left` (default: the first) left-aligned."""
    left = {0} if left is None else left
    rule = "|".join("---" if i in left else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if column.startswith("share"):
            return f"{value:.1%}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Any list of row dicts as a markdown table, columns in order of first appearance;
    columns holding anything but numbers are left-aligned."""
    columns = _ordered(dict.fromkeys(key for row in rows for key in row), ["direction"], ["label"])
    text = {i for i, c in enumerate(columns) if any(_is_text(row.get(c)) for row in rows)}
    return md_table(columns, [[_cell(c, row.get(c)) for c in columns] for row in rows], text)


def _ordered(names: Iterable[str], first: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    """`names` led by those in `first` and closed by those in `last`, each in that order, the
    rest as given: results.json is written with sorted keys, its own order means nothing."""
    rank = {name: i for i, name in enumerate([*first, "", *last])}
    return sorted(names, key=lambda name: rank.get(name, len(first)))


def _is_text(value: Any) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))


def _metric_line(label: str, row: dict[str, Stat], seeds: str) -> list[str]:
    recall = [row[key].text(1) for key in RECALL_KEYS]
    params = f"{row['parameters'].mean:.2f}" if row["parameters"].n else "—"
    return [label, *recall, params, row["latency"].text(3), seeds]


def metric_table(
    results: Results, variants: dict[str, str], group: str, first: list[list[str]] | None = None
) -> str:
    """Table II / III layout for `variants` (name -> label) in `group`, after the `first` rows."""
    header = ["Model", *RECALL_HEADERS, "Params (M)", "ms / pair", "Seeds"]
    lines = [
        _metric_line(label, variant_row(results, v, group), str(len(runs_for(results, v, group))))
        for v, label in variants.items()
    ]
    missing = [label for label, *_, seeds in lines if seeds == "0"]
    note = f"\n\nNot run: {', '.join(missing)}." if missing else ""
    return md_table(header, (first or []) + lines) + note


def _figure_link(results: Results, name: str, alt: str) -> str:
    if name not in available_figures(results):
        return f"*No data for {alt}.*"
    return f"![{alt}]({FIGURES_DIR}/{FIGURE_FILES[name]})"


def _header(results: Results) -> str:
    seeds = results.get("seeds") or []
    metrics = lookup(results, "teacher", "metrics") or {}
    counts = (
        f" ({metrics['n_images']} images, {metrics['n_captions']} captions)"
        if {"n_images", "n_captions"} <= metrics.keys()
        else ""
    )
    shortlist = lookup(results, "teacher", "shortlist")
    if shortlist:
        counts += f", a shortlist: the {shortlist} of the split, every pair of them scored"
    facts = [
        f"- Command: `{results.get('command', '?')}`",
        f"- Date: {results.get('date', '?')}",
        f"- Dataset / split: {results.get('dataset', '?')} / {results.get('split', '?')}" + counts,
        f"- Profile: {results.get('profile', '?')}",
        f"- Seeds: {', '.join(map(str, seeds)) or '?'} ({len(seeds)})",
        f"- Student runs: {len(results.get('students') or [])}",
    ]
    guide = (
        "How to read this report. Every student number is the mean ± sample standard deviation"
        f" (ddof=1) over the {len(seeds)} seed(s) listed (the plain mean for one seed); the"
        " teacher is trained once. TR is text retrieval (an image query ranks captions), IR is"
        " image retrieval (a caption ranks images); R@K is the percentage of queries whose match"
        " is in the top K over the full test matrix, and RSUM is the sum of the six recalls."
        " M+1 is the number of candidates the teacher scores per query, M'+1 the number the"
        " student trains on. Absolute numbers on this benchmark are not comparable with the"
        " paper's Flickr30K / MS-COCO ones (there, R@1 TR / IR: teacher 83.7 / 62.2, DCD"
        " 75.6 / 53.7); the orderings are what is reproduced. A claim is *supported* when every"
        " comparison it makes exceeds one pooled standard deviation, *not supported* when one"
        " is reversed by more than that, and *inconclusive* otherwise or with a single seed."
    )
    title = f"# DCD reproduction report: {results.get('dataset', '?')}"
    return "\n".join([title, "", *facts, "", guide])


def _table2(results: Results) -> str:
    teacher = results.get("teacher") or {}
    label = f"Teacher ({teacher.get('layers', '?')}L)"
    first = [_metric_line(label, metric_row([teacher] if teacher else []), "—")]
    return "## Table II analogue: baselines\n\n" + metric_table(results, TABLE2, "table2", first)


def _table3(results: Results) -> str:
    return "## Table III analogue: ablations\n\n" + metric_table(results, TABLE3, "table3")


MINIMAL_PAIRS_INTRO = (
    "How often each model prefers the right member of a minimal pair (two test images that"
    " differ in one thing): the share of comparisons in which an image scores its own caption"
    " above its twin's (TR) and a caption scores its own image above the twin (IR), averaged"
    " over both directions; 0.50 is chance. A bag of words cannot separate colour swaps or"
    " flipped relations; a model that binds attributes to objects can."
)


def _minimal_pair_share(record: dict[str, Any], change: str) -> float | None:
    shares = lookup(record, "minimal_pairs", change)
    return None if shares is None else (shares["tr"] + shares["ir"]) / 2


def _minimal_pairs(results: Results) -> str:
    """Teacher and Table II models by kind of change; empty when the dataset names no twins."""
    teacher = results.get("teacher") or {}
    rows = [(f"Teacher ({teacher.get('layers', '?')}L)", [teacher] if teacher else [])]
    for variant, label in TABLE2.items():
        runs = runs_for(results, variant, "table2")
        rows.append((label, [(run.get("summary") or {}).get("test") or {} for run in runs]))
    changes = sorted(
        {change for _, records in rows for r in records for change in r.get("minimal_pairs", {})}
        - {"all"}
    )
    if not changes:
        return ""
    columns = [*changes, "all"]
    lines = [
        [label, *(stat(_minimal_pair_share(r, c) for r in records).text(2) for c in columns)]
        for label, records in rows
    ]
    table = md_table(["Model", *(c.replace("_", " ") for c in columns)], lines)
    return "## Minimal pairs\n\n" + MINIMAL_PAIRS_INTRO + "\n\n" + table


def _fig3_line(point: Fig3Point) -> list[str]:
    recall = [point.metric(key).text(1) for key in ("tr_r1", "ir_r1", "rsum")]
    return [point.label, *recall, point.train_seconds.text(1), str(len(point.runs))]


def _fig3(results: Results) -> str:
    rows = [_fig3_line(point) for point in fig3_points(results)]
    header = ["(M+1, M'+1)", "TR R@1", "IR R@1", "RSUM", "Train time (s)", "Seeds"]
    table = md_table(header, rows) if rows else "*No Fig. 3 runs.*"
    link = _figure_link(results, "fig3", "Fig. 3: R@1 and training time per (M+1, M'+1)")
    return "## Fig. 3 analogue: candidates M+1 and kept M'+1\n\n" + link + "\n\n" + table


def _gap_line(label: str, curve: Curve | None) -> str:
    if curve is None:
        return f"- {label}: no separability records."
    last = len(curve.epochs) - 1
    return (
        f"- {label}: final gap {curve.final_gap.text(2)} (positive"
        f" {curve.positive[last].text(2)}, top-3 negatives {curve.negative[last].text(2)}"
        f" at epoch {curve.epochs[last]})."
    )


def _fig4(results: Results) -> str:
    curves = separability_curves(results)
    lines = [_gap_line(label, curves.get(v)) for v, label in FIG4_VARIANTS.items()]
    teacher = lookup(results, "teacher", "separability") or {}
    if {"val_positive", "val_top3_negative"} <= teacher.keys():
        gap = teacher["val_positive"] - teacher["val_top3_negative"]
        lines.append(
            f"- Teacher (reference): gap {gap:.2f} (positive"
            f" {teacher['val_positive']:.2f}, top-3 negatives"
            f" {teacher['val_top3_negative']:.2f})."
        )
    link = _figure_link(results, "fig4", "Fig. 4: validation score of positive and negatives")
    intro = (
        "Student mean validation score of the positive and of its three highest negatives"
        " over training (mean over seeds): before the first step, every `separability_every`"
        " steps and at each epoch end; the gap is positive minus negatives."
    )
    return "## Fig. 4 analogue: separability\n\n" + "\n\n".join([intro, link, "\n".join(lines)])


def _top_per_direction(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The first `count` rows of each direction (the preset sorts by times mined)."""
    seen: Counter[Any] = Counter()
    kept = []
    for row in rows:
        seen[row.get("direction")] += 1
        kept += [row] if seen[row.get("direction")] <= count else []
    return kept


def _entropy_summary(histogram: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for direction, rows in histogram.items():
        queries = sum(row.get("queries", 0) for row in rows)
        edges = [bin_edges(row) for row in rows]
        mean = ""
        if queries and None not in edges:
            centre = sum((lo + hi) / 2 * r.get("queries", 0) for (lo, hi), r in zip(edges, rows))
            mean = f", mean ≈ {centre / queries:.2f} nats (max ln(M'+1) = {edges[-1][1]:.2f})"
        lines.append(f"- {direction}: {queries} queries{mean}.")
    return "\n".join(lines)


def _inspection(results: Results) -> str:
    inspect = results.get("inspect") or {}
    parts = ["## Hard negatives (teacher knowledge cache)", INSPECT_INTRO]
    for name in _ordered(inspect, list(INSPECT_TITLES)):
        parts += [f"### {INSPECT_TITLES.get(name, name)}", _inspect_body(results, name)]
    return "\n\n".join(parts if inspect else [*parts, "*No inspection results.*"])


def _inspect_body(results: Results, name: str) -> str:
    rows = results["inspect"][name] or []
    if name == "entropy_histogram":
        link = _figure_link(results, "entropy", "Teacher entropy histogram per direction")
        return link + "\n\n" + _entropy_summary(entropy_rows(results))
    if name == "hard_negatives":
        rows = _top_per_direction(rows, HARD_NEGATIVES_SHOWN)
    return rows_table(rows) if rows else "*Empty.*"


def _claims(results: Results) -> str:
    return "## Claims\n\n" + "\n".join(claim.text() for claim in claims(results))


def _timings(results: Results) -> str:
    given = results.get("timings") or {}
    timings = {k: given[k] for k in _ordered(given, STAGE_ORDER) if given[k] is not None}
    if not timings:
        return "## Timings per stage\n\n*No timings recorded.*"
    total = sum(timings.values())
    rows = [
        [stage, f"{sec:.1f}", f"{sec / 60:.1f}", f"{sec / total:.1%}" if total else "—"]
        for stage, sec in [*timings.items(), ("**total**", total)]
    ]
    return "## Timings per stage\n\n" + md_table(["Stage", "Seconds", "Minutes", "Share"], rows)


def render_markdown(results: Results) -> str:
    """The whole report.md text; figures are linked as figures/<name>.png when drawn."""
    sections = (
        _header, _table2, _table3, _fig3, _fig4, _minimal_pairs, _inspection, _claims, _timings
    )  # fmt: skip
    texts = [section(results) for section in sections]
    return "\n\n".join(text for text in texts if text) + "\n"
