"""The report stage: RUN_DIR/results.json -> RUN_DIR/report.md and RUN_DIR/figures/*.png.

    dcd report runs/run

Pure rendering lives in `pipeline.report` (markdown) and `pipeline.figures` (PNGs); this stage
only reads, writes atomically (temporary name, then rename) and removes figures the results no
longer have data for, so a rebuild from the same results.json gives the same files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.figures import FIGURE_FILES, FIGURES_DIR, make_figures, save_png
from pipeline.fsio import atomic_path, write_text
from pipeline.report import ReportError, render_markdown

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def load_results(path: Path) -> dict[str, Any]:
    """results.json as a dict; ReportError naming the file when it is missing or malformed."""
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; `dcd run` writes it, run that first") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(results).__name__}")
    return results


def run(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md and its figures from RUN_DIR/results.json; returns report.md."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS_FILE)

    # figures first, so the report never links a PNG that is not there yet
    figures = make_figures(results)
    for name, file_name in FIGURE_FILES.items():
        dest = run_dir / FIGURES_DIR / file_name
        if name in figures:
            with atomic_path(dest) as tmp:
                save_png(figures[name], tmp)
        elif dest.exists():
            dest.unlink()  # drawn from an older results.json that had the data

    report = run_dir / REPORT_FILE
    write_text(report, render_markdown(results))
    log.info(
        "report: %s and %d figure(s) in %.1f s", report, len(figures), time.perf_counter() - started
    )
    return report
