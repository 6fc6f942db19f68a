"""The teacher stage end to end (stages/cache.py) on the tiny shapes data, plus its CLI commands.

.venv/bin/python -m pytest tests/test_cache.py -x -q            # the slow Ray test included
.venv/bin/python -m pytest tests/test_cache.py -x -q -m "not slow"
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.config import ConfigError, load_config
from pipeline.data import dataset_spec, open_data
from pipeline.groups import GroupError, make_groups
from pipeline.inspection import PRESETS, open_cache
from pipeline.models import ModelError, load_model, save_model
from pipeline.shards import CacheError, read_manifest, verify_cache
from stages import cache
from stages.cli import app

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

# 64 train images in groups of G = 8: 8 groups per round; 3 groups per shard gives shards of
# 3, 3 and 2 groups, so the short last shard of a round is covered too.
GROUP_SIZE, KEEP, GROUPS_PER_SHARD, ROUNDS = 8, 3, 3, 2
GROUPS_PER_ROUND = 64 // GROUP_SIZE
SHARDS = ROUNDS * 3


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory) -> Path:
    """The tiny model with noise on every weight: at random init its logits are nearly
    constant, which would make every rank a tie; perturbed, the teacher makes real mistakes."""
    model = load_model(tiny.model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return save_model(model, tmp_path_factory.mktemp("teacher") / "model")


def overrides(tiny, teacher: Path, out: Path, **changes) -> list[str]:
    fields = {
        "teacher": teacher,
        "out": out,
        "group_size": GROUP_SIZE,
        "keep": KEEP,
        "rounds": ROUNDS,
        "groups_per_shard": GROUPS_PER_SHARD,
        "workers": 0,
        "threads": 1,
    }
    fields.update(changes)
    return tiny.data_overrides() + [f"{key}={value}" for key, value in fields.items()]


def make_config(tiny, teacher: Path, out: Path, **changes) -> cache.CacheConfig:
    return load_config(cache.CacheConfig, None, overrides(tiny, teacher, out, **changes))


@pytest.fixture(scope="module")
def built(tiny, teacher, tmp_path_factory) -> tuple[cache.CacheConfig, dict]:
    """One finished cache, shared read-only; tests that change it work on a copy."""
    config = make_config(tiny, teacher, tmp_path_factory.mktemp("built") / "cache")
    return config, cache.run(config)


def copy_of(built, tmp_path: Path) -> cache.CacheConfig:
    config, _ = built
    shutil.copytree(config.out, tmp_path / "cache")
    return config.model_copy(update={"out": tmp_path / "cache"})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but config.yaml, which records runtime fields such as `out`."""
    paths = sorted(Path(folder).iterdir())
    return {path.name: path.read_bytes() for path in paths if path.name != "config.yaml"}


def read_rows(folder: Path) -> pa.Table:
    names = [entry.name for entry in read_manifest(folder).shards]
    return pa.concat_tables([pq.read_table(Path(folder) / name) for name in names])


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".old")))


# ----------------------------------------------------------------------------- end to end


def test_writes_shards_and_manifest(built):
    config, summary = built
    manifest = read_manifest(config.out)
    names = [f"shard-{i:05d}.parquet" for i in range(SHARDS)]
    assert [entry.name for entry in manifest.shards] == names
    assert sorted(p.name for p in config.out.glob("shard-*.parquet")) == names
    assert verify_cache(config.out, deep=True) == []
    assert (manifest.group_size, manifest.keep, manifest.rounds) == (GROUP_SIZE, KEEP, ROUNDS)
    assert set(manifest.fingerprints) == {"dataset", "teacher", "tokenizer"}
    assert (config.out / "config.yaml").is_file()

    rows = ROUNDS * GROUPS_PER_ROUND * 2 * GROUP_SIZE
    assert read_rows(config.out).num_rows == rows == summary["rows"]
    assert sum(entry.rows for entry in manifest.shards) == rows
    assert summary["shards"] == summary["shards_written"] == SHARDS
    assert summary["pairs"] == ROUNDS * GROUPS_PER_ROUND * GROUP_SIZE**2


def test_rows_are_the_planned_groups(built, tiny):
    config, _ = built
    split = dataset_spec(tiny.data_config()).load().split("train")
    table = read_rows(config.out).to_pydict()
    found = collections.defaultdict(dict)
    for r, d, g, q, p in zip(
        table["round"],
        table["direction"],
        table["group_id"],
        table["query_id"],
        table["positive_id"],
    ):
        found[(r, g)].setdefault(d, []).append((q, p))
    assert len(found) == ROUNDS * GROUPS_PER_ROUND
    for round_index in range(ROUNDS):
        for group_id, group in enumerate(make_groups(split, GROUP_SIZE, config.seed, round_index)):
            pairs = [tuple(pair) for pair in group.tolist()]
            assert found[(round_index, group_id)]["tr"] == pairs
            assert found[(round_index, group_id)]["ir"] == [(c, i) for i, c in pairs]


def test_logits_match_a_plain_model_forward(built, teacher, tiny):
    """Oracle: cached logits equal model(input_ids, attention_mask, pixel_values, pixel_mask)
    on each pair; an IR row of caption c holds score(image, c), not score(c's image, ...)."""
    config, _ = built
    data = open_data(tiny.data_config(), ("train",))
    model = load_model(teacher)
    table = read_rows(config.out)
    chosen = pc.and_(pc.equal(table["group_id"], 1), pc.equal(table["round"], 0))
    for row in table.filter(chosen).to_pylist():
        tr = row["direction"] == "tr"
        candidates = row["candidate_ids"]
        image_ids = [row["query_id"]] * len(candidates) if tr else candidates
        caption_ids = candidates if tr else [row["query_id"]] * len(candidates)
        pixels, pixel_mask = data.images.batch(image_ids)
        input_ids, attention_mask = data.captions.batch(caption_ids)
        with torch.inference_mode():
            expected = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixels,
                pixel_mask=pixel_mask,
            ).logits[:, 0]
        np.testing.assert_allclose(row["candidate_logits"], expected.numpy(), atol=1e-4)


def test_rounds_draw_different_groups(built):
    config, _ = built
    table = read_rows(config.out).to_pydict()
    groups = collections.defaultdict(set)  # (round, group_id) -> image ids
    for r, d, g, q in zip(table["round"], table["direction"], table["group_id"], table["query_id"]):
        if d == "tr":
            groups[(r, g)].add(q)
    rounds = [{frozenset(ids) for (r, _), ids in groups.items() if r == i} for i in range(ROUNDS)]
    everyone = set().union(*rounds[0])
    assert len(everyone) == 64 and set().union(*rounds[1]) == everyone  # each round covers all
    assert not rounds[0] & rounds[1]  # and no group repeats (overwhelmingly likely by chance)


def test_presets_agree_with_pyarrow(built):
    config, _ = built
    table = read_rows(config.out).to_pydict()
    ranks = collections.defaultdict(list)
    for direction, rank in zip(table["direction"], table["positive_rank"]):
        ranks[direction].append(rank)
    con = open_cache(config.out)

    errors = {row["direction"]: row for row in PRESETS["genetic_errors"](con).to_pylist()}
    outside = {row["direction"]: row for row in PRESETS["positive_outside_topk"](con).to_pylist()}
    histogram = PRESETS["entropy_histogram"](con).to_pylist()
    for direction in ("tr", "ir"):
        expected = sum(rank > 1 for rank in ranks[direction])
        assert 0 < expected < len(ranks[direction])  # the teacher is neither perfect nor constant
        assert errors[direction]["genetic_errors"] == expected
        assert errors[direction]["queries"] == len(ranks[direction]) == 64 * ROUNDS
        assert outside[direction]["outside_topk"] == sum(r > KEEP for r in ranks[direction])
        assert sum(r["queries"] for r in histogram if r["direction"] == direction) == 64 * ROUNDS

    mined = collections.Counter()
    for direction, topk in zip(table["direction"], table["topk_ids"]):
        mined.update((direction, candidate) for candidate in topk[1:])
    for row in PRESETS["hard_negatives"](con).to_pylist():
        assert row["times_hard"] == mined[(row["direction"], row["candidate_id"])]


# ----------------------------------------------------------------------------- resume


def test_rerun_skips_everything_and_keeps_bytes(built, tmp_path, monkeypatch):
    config = copy_of(built, tmp_path)
    before = snapshot(config.out)

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished shard was scored again")

    monkeypatch.setattr(cache.ShardWorker, "write", no_scoring)
    # runtime fields (threads, workers) may change between runs
    summary = cache.run(config.model_copy(update={"threads": 2}))
    assert summary["shards_written"] == 0 and summary["groups"] == 0
    assert snapshot(config.out) == before


def test_rerun_rewrites_only_missing_shards(built, tmp_path):
    config = copy_of(built, tmp_path)
    before = snapshot(config.out)
    (config.out / "shard-00004.parquet").unlink()
    # a temporary left by a killed run (another pid) must not survive the rerun
    (config.out / ".shard-00004.parquet.99999.tmp").write_bytes(b"half a shard")
    (config.out / ".manifest.json.99999.tmp").write_text("{")
    summary = cache.run(config)
    assert summary["shards_written"] == 1 and summary["groups"] == GROUPS_PER_SHARD
    assert snapshot(config.out) == before
    assert temporaries(config.out) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_rerun_repairs_a_damaged_shard(built, tmp_path, damage: str):
    """A rerun must not hash a damaged shard into the manifest (which would hide it)."""
    config = copy_of(built, tmp_path)
    before = snapshot(config.out)
    path = config.out / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data) if damage == "flip" else bytes(data[: len(data) // 2]))
    assert verify_cache(config.out) != []
    summary = cache.run(config)
    assert summary["shards_written"] == 1
    assert verify_cache(config.out) == []
    assert snapshot(config.out) == before


def test_kill_then_resume_equals_uninterrupted(built, tiny, teacher, tmp_path):
    """kill -9 of `dcd teacher cache` after its first shard; a rerun finishes the same bytes."""
    changes = {"group_size": 64, "keep": 4, "rounds": 6, "groups_per_shard": 1}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "stages.cli", "teacher", "cache"]
    for item in overrides(tiny, teacher, killed, **changes):
        command += ["--set", item]
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while not list(killed.glob("shard-*.parquet")):
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no shard after 240 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = sorted(p.name for p in killed.glob("shard-*.parquet"))
    assert 1 <= len(done) < 6, "the run finished before it was killed; nothing was resumed"
    assert read_manifest(killed).shards == []  # listed only at the end of a run

    resumed = cache.run(make_config(tiny, teacher, killed, **changes))
    assert resumed["shards_written"] == 6 - len(done)
    cache.run(make_config(tiny, teacher, clean, **changes))

    shards = sorted(p.name for p in clean.glob("shard-*.parquet"))
    assert len(shards) == 6
    assert sorted(p.name for p in killed.glob("shard-*.parquet")) == shards
    for name in shards:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    assert read_manifest(killed).shards == read_manifest(clean).shards
    assert temporaries(killed) == temporaries(clean) == []
    assert verify_cache(killed) == []


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"keep": 4}, "keep"),
        ({"seed": 1}, "seed"),
        ({"data.max_tokens": 20}, "max_tokens"),
        ({"groups_per_shard": 2}, "groups_per_shard"),
        ({"rounds": 3}, "rounds"),
    ],
)
def test_changed_config_is_refused(built, tiny, teacher, tmp_path, change, field):
    config = copy_of(built, tmp_path)
    before = snapshot(config.out)
    changed = make_config(tiny, teacher, config.out, **change)
    with pytest.raises(CacheError, match=rf"{field}\S* differs"):
        cache.run(changed)
    assert snapshot(config.out) == before


def test_different_teacher_is_refused(built, tiny, tmp_path):
    config = copy_of(built, tmp_path)
    before = snapshot(config.out)
    with pytest.raises(CacheError, match="teacher fingerprint differs"):
        cache.run(config.model_copy(update={"teacher": tiny.model_dir}))
    assert snapshot(config.out) == before


def test_moved_teacher_is_the_same_teacher(built, tmp_path):
    """The fingerprint is of the weights, so a copied teacher folder reuses the cache."""
    config = copy_of(built, tmp_path)
    moved = shutil.copytree(config.teacher, tmp_path / "moved-teacher")
    assert cache.run(config.model_copy(update={"teacher": moved}))["shards_written"] == 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        ({"group_size": 1}, ["group_size"]),
        ({"keep": 8}, ["keep", "group_size"]),
        ({"keep": 9}, ["keep", "group_size"]),
        ({"rounds": 0}, ["rounds"]),
    ],
)
def test_bad_config_names_the_keys(tiny, teacher, tmp_path, change, keys):
    with pytest.raises(ConfigError) as error:
        make_config(tiny, teacher, tmp_path / "cache", **change)
    for key in keys:
        assert key in str(error.value)


def test_group_larger_than_split(tiny, teacher, tmp_path):
    config = make_config(tiny, teacher, tmp_path / "cache", group_size=65)
    with pytest.raises(GroupError, match=r"group_size=65.*\[2, 64\]"):
        cache.run(config)
    assert not config.out.exists()


def test_missing_teacher(tiny, tmp_path):
    config = make_config(tiny, tmp_path / "no-teacher", tmp_path / "cache")
    with pytest.raises(ModelError, match="no-teacher"):
        cache.run(config)
    assert not config.out.exists()


def test_non_finite_teacher_writes_no_shard(tiny, teacher, tmp_path):
    model = load_model(teacher)
    with torch.no_grad():
        model.rank_output.weight[0, 3] = float("nan")
    broken = save_model(model, tmp_path / "nan-teacher")
    config = make_config(tiny, broken, tmp_path / "cache")
    with pytest.raises(CacheError, match=r"round 0, group 0: the teacher scored .* as nan"):
        cache.run(config)
    assert list(config.out.glob("shard-*")) == [] and temporaries(config.out) == []
    assert read_manifest(config.out).shards == []


# ----------------------------------------------------------------------------- CLI


def test_cli_verify_names_a_damaged_shard(built, tmp_path):
    config = copy_of(built, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "verify", str(config.out)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout

    flipped = config.out / "shard-00001.parquet"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = config.out / "shard-00004.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-10])

    result = runner.invoke(app, ["cache", "verify", str(config.out)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("shard-00001.parquet:") and "sha256" in line for line in lines)
    assert any(line.startswith("shard-00004.parquet:") and "truncated" in line for line in lines)
    assert not any(
        line.startswith(("shard-00000", "shard-00002", "shard-00003", "shard-00005"))
        for line in lines
    )
    assert "2 problem(s)" in result.stdout


def test_cli_cache_then_inspect(tiny, teacher, tmp_path):
    out = tmp_path / "cache"
    runner = CliRunner()
    args = ["teacher", "cache", "--teacher", str(teacher), "--out", str(out), "--workers", "0"]
    for item in tiny.data_overrides() + ["group_size=16", "keep=4", "max_groups=3"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shards_written"] == 1 and summary["rows"] == 3 * 2 * 16
    assert verify_cache(out) == []

    table = read_rows(out).to_pydict()
    result = runner.invoke(
        app, ["inspect", str(out), "--preset", "genetic_errors", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    report = {row["direction"]: row for row in json.loads(result.stdout)}
    for direction in ("tr", "ir"):
        ranks = [r for d, r in zip(table["direction"], table["positive_rank"]) if d == direction]
        assert report[direction]["queries"] == len(ranks) == 48
        assert report[direction]["genetic_errors"] == sum(rank > 1 for rank in ranks)
        assert report[direction]["share"] == pytest.approx(np.mean(np.array(ranks) > 1))

    # several presets in JSON still make one document
    result = runner.invoke(
        app, ["inspect", str(out), "-p", "genetic_errors", "-p", "margins", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"genetic_errors", "margins"}

    result = runner.invoke(
        app, ["inspect", str(out), "--sql", "SELECT count(*) AS n FROM queries", "--format", "json"]
    )
    assert json.loads(result.stdout) == [{"n": 96}]
    for write in ("CREATE TABLE x AS SELECT 1", f"COPY queries TO '{tmp_path}/leak.csv'"):
        result = runner.invoke(app, ["inspect", str(out), "--sql", write])
        assert result.exit_code == 2, result.output
        assert "read-only" in result.stderr
    assert not (tmp_path / "leak.csv").exists()


def test_cli_errors_are_messages_not_tracebacks(tiny, teacher, tmp_path):
    runner = CliRunner()
    args = [
        "teacher",
        "cache",
        "--teacher",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "cache"),
        "--workers",
        "0",
    ]
    for item in tiny.data_overrides() + ["group_size=8", "keep=3"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "missing" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no manifest" in result.stderr


# ----------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_workers_write_the_same_bytes(built, tmp_path):
    import ray

    config, _ = built
    ray_config = config.model_copy(update={"out": tmp_path / "ray", "workers": 2, "threads": 1})
    try:
        summary = cache.run(ray_config)
    finally:
        ray.shutdown()
    assert summary["shards_written"] == SHARDS
    for name in [f"shard-{i:05d}.parquet" for i in range(SHARDS)] + ["manifest.json"]:
        assert (ray_config.out / name).read_bytes() == (config.out / name).read_bytes(), name
