"""What the report's figures plot, and the drawing: seed statistics (`Stat`), the runs of a
variant, the series behind Figs. 3 and 4 and the entropy histogram, then matplotlib (Agg, no
pyplot state) figures of them.

    python -c "import json; from pipeline.figures import make_figures, save_png;
    figures = make_figures(json.load(open('runs/run/results.json')));
    [save_png(f, f'/tmp/{name}.png') for name, f in figures.items()]"

`save_png` fixes the metadata, so the same results give the same bytes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Results = dict[str, Any]
Run = dict[str, Any]

FIG4_VARIANTS = {"vanilla_kd": "Vanilla KD", "wsl_kd": "WSL KD", "dcd": "DCD"}
FIGURE_FILES = {"fig3": "fig3.png", "fig4": "fig4.png", "entropy": "entropy.png"}
FIGURES_DIR = "figures"
DPI = 110
DIRECTIONS = {"tr": "TR: image queries", "ir": "IR: caption queries"}
COLOURS = {
    "vanilla_kd": "tab:blue",
    "wsl_kd": "tab:orange",
    "dcd": "tab:green",
    "tr": "tab:blue",
    "ir": "tab:red",
}


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """One quantity over seeds (no values: the run is missing)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN below two values."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def text(self, digits: int = 1) -> str:
        if not self.values:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: Iterable[float | None]) -> Stat:
    return Stat(tuple(float(value) for value in values if value is not None))


# ----------------------------------------------------------------------------- series


def lookup(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]..., or None where a key or a level is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def runs_for(results: Results, variant: str, group: str) -> list[Run]:
    """The runs (one per seed) of `variant` in `group` ("table2", ...), else those named
    `variant` (the runs a Table shares, whatever their groups)."""
    students = results.get("students") or []
    chosen = [r for r in students if r.get("variant") == variant and group in r.get("groups", [])]
    return chosen or [r for r in students if r.get("name") == variant]


@dataclass(frozen=True)
class Fig3Point:
    """One (M+1, M'+1) point of Fig. 3 and its runs over seeds."""

    candidates: int
    keep: int
    runs: tuple[Run, ...]

    @property
    def label(self) -> str:
        return f"({self.candidates}, {self.keep})"

    def metric(self, key: str) -> Stat:
        return stat(lookup(run, "summary", "test", "metrics", key) for run in self.runs)

    @property
    def train_seconds(self) -> Stat:
        return stat(lookup(run, "summary", "train_seconds") for run in self.runs)


def fig3_points(results: Results) -> list[Fig3Point]:
    """Runs in group "fig3", one point per (candidates, keep), sorted by M+1 then M'+1."""
    points: dict[tuple[int, int], list[Run]] = {}
    for run in results.get("students") or []:
        key = (run.get("candidates"), run.get("keep"))
        if "fig3" in run.get("groups", []) and None not in key:
            points.setdefault(key, []).append(run)
    return [Fig3Point(m, k, tuple(runs)) for (m, k), runs in sorted(points.items())]


@dataclass(frozen=True)
class Curve:
    """Fig. 4 for one variant: per epoch, the student's mean validation score of the positive
    and of its three highest negatives, over seeds; `final_gap` per seed at its last epoch."""

    epochs: tuple[float, ...]
    positive: tuple[Stat, ...]
    negative: tuple[Stat, ...]
    final_gap: Stat


def _epoch_events(run: Run) -> list[dict[str, Any]]:
    """Separability records in training order, one per point in time: the probes taken every
    few steps (epoch as a fraction, 0 = before training) and the epoch ends, which win where a
    probe fell on the same step."""
    events = lookup(run, "summary", "separability") or []
    keys = ("epoch", "val_positive", "val_top3_negative")
    by_epoch: dict[float, dict[str, Any]] = {}
    for event in sorted(
        (e for e in events if all(k in e for k in keys)), key=lambda e: e.get("event") != "probe"
    ):
        by_epoch[round(float(event["epoch"]), 4)] = event
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def separability_curve(runs: list[Run]) -> Curve | None:
    per_run = [events for events in map(_epoch_events, runs) if events]
    if not per_run:
        return None
    epochs = sorted({e["epoch"] for events in per_run for e in events})
    by_epoch = [
        [e for events in per_run for e in events if e["epoch"] == epoch] for epoch in epochs
    ]
    gaps = stat(ev[-1]["val_positive"] - ev[-1]["val_top3_negative"] for ev in per_run)
    return Curve(
        tuple(epochs),
        tuple(stat(e["val_positive"] for e in at) for at in by_epoch),
        tuple(stat(e["val_top3_negative"] for e in at) for at in by_epoch),
        gaps,
    )


def separability_curves(results: Results) -> dict[str, Curve]:
    """Fig. 4 variants with separability records, keyed by variant."""
    curves = {v: separability_curve(runs_for(results, v, "table2")) for v in FIG4_VARIANTS}
    return {variant: curve for variant, curve in curves.items() if curve is not None}


def entropy_rows(results: Results) -> dict[str, list[dict[str, Any]]]:
    """The inspection entropy histogram, rows per direction (tr, ir, others), in bin order."""
    by_direction: dict[str, list[dict[str, Any]]] = {}
    for row in lookup(results, "inspect", "entropy_histogram") or []:
        by_direction.setdefault(str(row.get("direction", "all")), []).append(row)
    order = sorted(by_direction, key=lambda d: (list(DIRECTIONS) + [d]).index(d))
    return {d: sorted(by_direction[d], key=lambda r: r.get("bin", 0)) for d in order}


def bin_edges(row: dict[str, Any]) -> tuple[float, float] | None:
    """(low, high) of an entropy bin; the preset names them low/high, older files lo/hi."""
    low, high = row.get("low", row.get("lo")), row.get("high", row.get("hi"))
    return None if low is None or high is None else (float(low), float(high))


def available_figures(results: Results) -> list[str]:
    """Names (keys of FIGURE_FILES) of the figures the results have data for."""
    sources: dict[str, Callable[[Results], Any]] = {
        "fig3": fig3_points,
        "fig4": separability_curves,
        "entropy": entropy_rows,
    }
    return [name for name, source in sources.items() if source(results)]


# ----------------------------------------------------------------------------- drawing


def _figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, columns, squeeze=False)[0])


def _spread(stats: Iterable[Stat]) -> list[float]:
    """Error bar half-widths: the std, 0 where one seed gives none."""
    return [s.std if s.n > 1 else 0.0 for s in stats]


def fig3_figure(points: list[Fig3Point]) -> Figure:
    """Test R@1 (TR, IR; mean ± std over seeds) and training time per (M+1, M'+1) point."""
    figure, (recall, timing) = _figure(8.0, 3.2, columns=2)
    x = list(range(len(points)))
    for direction, shift in (("tr", -0.08), ("ir", 0.08)):
        stats = [p.metric(f"{direction}_r1") for p in points]
        recall.errorbar(
            [i + shift for i in x],
            [s.mean for s in stats],
            yerr=_spread(stats),
            fmt="o",
            capsize=3,
            color=COLOURS[direction],
            label=f"{direction.upper()} R@1",
        )
    seconds = [p.train_seconds for p in points]
    timing.bar(x, [s.mean for s in seconds], yerr=_spread(seconds), capsize=3, color="tab:gray")

    for axes, title, unit in (
        (recall, "Test R@1", "R@1 (%)"),
        (timing, "Student training time", "seconds"),
    ):
        axes.set_xticks(x, [f"{p.candidates}/{p.keep}" for p in points])
        axes.set_xlabel("M+1 / M'+1")
        axes.set_ylabel(unit)
        axes.set_title(title, fontsize=10)
    recall.legend(fontsize=8)
    figure.suptitle("Fig. 3 analogue: candidates scored (M+1) vs kept (M'+1)", fontsize=11)
    return figure


def _series(
    axes: Axes,
    curve_epochs: tuple[float, ...],
    stats: tuple[Stat, ...],
    colour: str,
    style: str,
    label: str,
) -> None:
    means = [s.mean for s in stats]
    axes.plot(curve_epochs, means, style, marker="o", markersize=3, color=colour, label=label)
    if all(s.n > 1 for s in stats):
        axes.fill_between(
            curve_epochs,
            [m - s.std for m, s in zip(means, stats)],
            [m + s.std for m, s in zip(means, stats)],
            color=colour,
            alpha=0.15,
            linewidth=0,
        )


def fig4_figure(curves: dict[str, Curve], teacher: dict[str, float] | None = None) -> Figure:
    """Per variant: mean validation score of the positive (solid) and of the three highest
    negatives (dashed) per epoch, band ± std over seeds; the teacher's as dotted lines."""
    figure, (axes,) = _figure(6.4, 4.2)
    for variant, curve in curves.items():
        colour, label = COLOURS.get(variant, "tab:purple"), FIG4_VARIANTS.get(variant, variant)
        _series(axes, curve.epochs, curve.positive, colour, "-", f"{label}: positive")
        _series(axes, curve.epochs, curve.negative, colour, "--", f"{label}: top-3 negatives")

    # the teacher is scored once, after its training: a horizontal reference
    teacher = teacher or {}
    for key, style, label in (
        ("val_positive", ":", "teacher: positive"),
        ("val_top3_negative", "-.", "teacher: top-3 negatives"),
    ):
        if key in teacher:
            axes.axhline(teacher[key], color="black", linestyle=style, linewidth=1, label=label)
    axes.set_xlabel("epoch (0 = the student as cut from the teacher)")
    all_epochs = [epoch for curve in curves.values() for epoch in curve.epochs]
    if all(float(epoch).is_integer() for epoch in all_epochs):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("mean score (logit), validation split")
    axes.set_title("Fig. 4 analogue: positive vs hardest negatives", fontsize=11)
    axes.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return figure


def entropy_figure(histogram: dict[str, list[dict[str, Any]]]) -> Figure:
    """One panel per direction: queries per bin of the teacher entropy over the kept M'+1."""
    figure, panels = _figure(3.6 * len(histogram), 3.0, columns=len(histogram))
    for axes, (direction, rows) in zip(panels, histogram.items()):
        edges = [bin_edges(row) for row in rows]
        counts = [row.get("queries", 0) for row in rows]
        if None in edges:
            axes.bar(
                [row.get("bin", i) for i, row in enumerate(rows)],
                counts,
                width=0.9,
                color=COLOURS.get(direction, "tab:gray"),
            )
            axes.set_xlabel("entropy bin")
        else:
            axes.bar(
                [lo for lo, _ in edges],
                counts,
                width=[hi - lo for lo, hi in edges],
                align="edge",
                color=COLOURS.get(direction, "tab:gray"),
                edgecolor="white",
            )
            axes.set_xlabel("teacher entropy (nats)")
        axes.set_ylabel("queries")
        axes.set_title(DIRECTIONS.get(direction, direction), fontsize=10)
    figure.suptitle("Teacher entropy over the kept M'+1 candidates", fontsize=11)
    return figure


def make_figures(results: Results) -> dict[str, Figure]:
    """The figures `available_figures` names, keyed like FIGURE_FILES."""
    draw: dict[str, Callable[[], Figure]] = {
        "fig3": lambda: fig3_figure(fig3_points(results)),
        "fig4": lambda: fig4_figure(
            separability_curves(results), lookup(results, "teacher", "separability")
        ),
        "entropy": lambda: entropy_figure(entropy_rows(results)),
    }
    return {name: draw[name]() for name in available_figures(results)}


def save_png(figure: Figure, path: Path | str) -> None:
    """PNG at DPI with no software/date metadata, so reruns write identical bytes."""
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
