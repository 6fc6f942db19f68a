"""The `dcd` command: parses arguments, builds a validated config and calls one stage.

dcd --help
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from pipeline.config import ConfigError, load_config
from pipeline.groups import GroupError
from pipeline.images import ImageError
from pipeline.karpathy import DataError
from pipeline.models import ModelError
from pipeline.runtime import setup_logging
from pipeline.shards import CacheError
from pipeline.text import TokenizerError
from pipeline.training import TrainingError

app = typer.Typer(
    help="Dynamic Contrastive Distillation for image-text retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: generate the shapes benchmark, check a dataset.", no_args_is_help=True
)
teacher_app = typer.Typer(
    help="The teacher: fine-tune it, cache its knowledge.", no_args_is_help=True
)
student_app = typer.Typer(
    help="Students: train one variant from the cache, or sweep many.", no_args_is_help=True
)
cache_app = typer.Typer(
    help="The knowledge cache: verify shards against the manifest.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(cache_app, name="cache")
app.add_typer(student_app, name="student")

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    ModelError,
    ImageError,
    TokenizerError,
    GroupError,
    TrainingError,
    CacheError,
)
log = logging.getLogger("dcd")
T = TypeVar("T")

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config file (defaults if omitted).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config field: --set dotted.key=value (repeatable)."
    ),
]
OutOpt = Annotated[Path | None, typer.Option(help="Output folder (config key `out`).")]


def register_errors(*errors: type[Exception]) -> None:
    """Let a stage module add its error types to those shown without a traceback."""
    global USER_ERRORS
    USER_ERRORS = USER_ERRORS + errors


def guarded(call: Callable[[], T]) -> T:
    """Run a stage; user-facing errors become one clear message and exit status 2."""
    try:
        return call()
    except USER_ERRORS as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def build(schema: type[T], config: Path | None, overrides: list[str] | None, /, **flags) -> T:
    """Config from file, then `--set` overrides, then the dedicated flags that were given."""
    extra = [
        f"{key}={json.dumps(str(v)) if isinstance(v, Path) else json.dumps(v)}"
        for key, v in flags.items()
        if v is not None
    ]
    return guarded(lambda: load_config(schema, config, [*(overrides or []), *extra]))


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


# --- data -----------------------------------------------------------------------------------


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Folder to write dataset.json and images/ into.")] = (
        Path("data/shapes")
    ),
    seed: int = 0,
    train: int = 2000,
    val: int = 100,
    test: int = 100,
    image_size: int = 64,
) -> None:
    """Generate the embedded shapes benchmark (same seed, same bytes)."""
    from pipeline.shapes import ShapesSpec, write_shapes

    for name, count in (("train", train), ("val", val), ("test", test)):
        if count < 2 or count % 2:
            raise typer.BadParameter(f"--{name} must be an even number >= 2 (minimal pairs)")
    path = write_shapes(ShapesSpec(train, val, test, image_size, seed), out)
    typer.echo(f"wrote {path} ({train + val + test} images)")


@data_app.command("check")
def data_check(
    name: Annotated[str, typer.Argument(help="Dataset name from data_manifest.yaml.")],
    manifest: Annotated[Path | None, typer.Option(help="Manifest file.")] = None,
    images: Annotated[bool, typer.Option(help="Open every image file.")] = True,
) -> None:
    """Validate a dataset against the manifest and list every problem in one report."""
    from pipeline.datacheck import check_dataset
    from pipeline.manifest import load_manifest

    spec = guarded(lambda: load_manifest(manifest).dataset(name))
    report = guarded(lambda: check_dataset(spec, verify_images=images))
    typer.echo(report.format())
    raise typer.Exit(0 if report.ok else 1)


# --- teacher --------------------------------------------------------------------------------


@teacher_app.command("finetune")
def teacher_finetune(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last epoch checkpoint.")] = False,
) -> None:
    """Fine-tune a retrieval model with ViLT's recipe (the teacher, or a direct student)."""
    from stages import finetune

    cfg = build(finetune.FinetuneConfig, config, set_, out=out, resume=resume or None)
    summary = guarded(lambda: finetune.run(cfg))
    typer.echo(json.dumps(summary, indent=2))


@teacher_app.command("cache")
def teacher_cache(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    teacher: Annotated[Path | None, typer.Option(help="Teacher model folder.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray actors (0: in process).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads per actor.")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster (default: a local one)."),
    ] = None,
) -> None:
    """Score in-batch groups with the teacher once and write Parquet shards + manifest."""
    from stages import cache

    cfg = build(
        cache.CacheConfig,
        config,
        set_,
        out=out,
        teacher=teacher,
        workers=workers,
        threads=threads,
        ray_address=ray_address,
    )
    summary = guarded(lambda: cache.run(cfg))
    typer.echo(json.dumps(summary, indent=2))


@student_app.command("train")
def student_train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last epoch checkpoint.")] = False,
) -> None:
    """Train one student variant from the cache, then evaluate it on the test split."""
    from stages import student

    cfg = build(student.StudentConfig, config, set_, out=out, cache=cache, resume=resume or None)
    summary = guarded(lambda: student.run(cfg))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "separability"}, indent=2))


@student_app.command("sweep")
def student_sweep(
    config: Annotated[Path, typer.Argument(help="Sweep YAML: runs, seeds, shared overrides.")],
    set_: SetOpt = None,
    out: OutOpt = None,
    workers: Annotated[int | None, typer.Option(help="Runs trained at once (Ray tasks).")] = None,
) -> None:
    """Train a list of variants x seeds from one cache; write results.csv and results.md."""
    from stages import sweep

    cfg = build(sweep.SweepConfig, config, set_, out=out, workers=workers)
    summary = guarded(lambda: sweep.run(cfg, Path(".")))
    typer.echo(Path(summary["results"]).read_text())


@cache_app.command("verify")
def cache_verify(
    cache_dir: Annotated[Path, typer.Argument(help="Cache folder (with manifest.json).")],
    deep: Annotated[bool, typer.Option(help="Also decode every row group.")] = False,
) -> None:
    """Check every shard against the manifest (sha256, rows, schema); name each bad one."""
    from pipeline.shards import verify_cache

    problems = guarded(lambda: verify_cache(cache_dir, deep=deep))
    for line in problems:
        typer.echo(line)
    typer.echo(f"{cache_dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    raise typer.Exit(1 if problems else 0)


@app.command("inspect")
def inspect(
    cache_dir: Annotated[Path, typer.Argument(help="Cache folder.")],
    preset: Annotated[
        list[str] | None, typer.Option("--preset", "-p", help="Preset report(s); default: all.")
    ] = None,
    sql: Annotated[str | None, typer.Option(help="Run this read-only SQL instead.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    texts: Annotated[
        bool,
        typer.Option(
            help="Join caption texts and image names from the dataset in the cache config."
        ),
    ] = True,
) -> None:
    """Read-only DuckDB over the cache: preset reports, or any SQL over its views."""
    from stages import inspect as stage

    for title, text in guarded(lambda: stage.run(cache_dir, preset, sql, fmt, texts)):
        typer.echo(f"-- {title}" if title else "")
        typer.echo(text)


# --- evaluate -------------------------------------------------------------------------------


@app.command("evaluate")
def evaluate(
    model: Annotated[Path | None, typer.Argument(help="Model folder (save_pretrained).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    split: Annotated[str | None, typer.Option(help="Split to evaluate (default test).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (1: in process).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster.")] = None,
) -> None:
    """Full-matrix retrieval evaluation: TR/IR R@1/5/10, RSUM, ranks, pairs/s."""
    from stages import evaluate as stage

    cfg = build(
        stage.EvaluateConfig,
        config,
        set_,
        model=model,
        out=out,
        split=split,
        workers=workers,
        ray_address=ray_address,
    )
    summary = guarded(lambda: stage.run(cfg))
    typer.echo(stage.format_table(summary))
    typer.echo(f"metrics: {Path(cfg.out) / 'metrics.json'}")


# --- the main job ---------------------------------------------------------------------------


def run_command(config: Path | None, quick: bool, seeds: int | None, set_: list[str] | None) -> str:
    """The `dcd run` command line as the report names it, overrides included."""
    return " ".join(
        ["dcd run"]
        + ([str(config)] if config else [])
        + (["--quick"] if quick else [])
        + ([f"--seeds {seeds}"] if seeds else [])
        + [f"--set {item}" for item in set_ or []]
    )


@app.command("run")
def run_all(
    config: ConfigArg = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    quick: Annotated[bool, typer.Option(help="The small profile (about 3 minutes).")] = False,
    seeds: Annotated[int | None, typer.Option(help="Seeds per student variant.")] = None,
) -> None:
    """Dataset -> teacher -> cache -> student variants -> evaluation -> report."""
    from stages import run as stage

    cfg = build(
        stage.RunConfig, config, set_, out=out, seeds=seeds, profile="quick" if quick else None
    )
    command = run_command(config, quick, seeds, set_)
    summary = guarded(lambda: stage.run(cfg, command))
    typer.echo(f"report: {summary['report']}\nartifacts: {summary['out']}")


@app.command("report")
def report(run_dir: Annotated[Path, typer.Argument(help="A `dcd run` output folder.")]) -> None:
    """Rebuild report.md and its figures from RUN_DIR/results.json."""
    from pipeline.report import ReportError
    from stages import report as stage

    register_errors(ReportError)
    typer.echo(f"report: {guarded(lambda: stage.run(run_dir))}")


if __name__ == "__main__":
    sys.exit(app())
