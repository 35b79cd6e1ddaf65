"""Preparation as plan / write shard i / finalize, without a cluster: tasks in other processes (the array
task's own entry point) write the single-machine bytes, whatever their order; finalize refuses an
incomplete folder; a resumed plan schedules only what is missing; a rerun touches nothing.

The same on real clusters: tests/cluster/test_prepare_ray.py (Ray tasks) and tests/cluster/test_prepare_slurm.py
(a Slurm job array)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.data.prepare import plans_for_run
from bigmodel_dist.data.prepare_plan import (
    STALE_TEMP_S,
    Plan,
    all_units,
    chunk,
    finalize,
    incomplete_units,
    save_plans,
    write_units,
)
from bigmodel_dist.run.resolve import resolve_run
from launcher.slurm.prepare import inherited_options, num_tasks
from tests.conftest import REPO
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli
from tests.helpers.launching import Launch
from tests.helpers.prepare_cases import files_of, make_corpus, overrides, prepare_locally, stamps_of


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The corpus, a shared tokenizer/`datasets` cache, and the single-machine reference folder."""
    root = tmp_path_factory.mktemp("prepare-cluster")
    corpus, cache = make_corpus(root / "corpus"), root / "cache"
    return corpus, cache, prepare_locally(corpus, cache, root / "reference")


def _plans(corpus, cache, out) -> list[Plan]:
    cfg = load_config(TINY_CONFIG, overrides(corpus, cache, out))
    return plans_for_run(cfg, resolve_run(cfg, world_size=1).shape.vocab_size)


def test_array_tasks_in_other_processes_write_the_single_machine_bytes(case, tmp_path):
    corpus, cache, reference = case
    plans = _plans(corpus, cache, tmp_path / "split")
    assert len(plans) == 1 and plans[0].num_shards >= 6
    assert Plan.from_json(plans[0].to_json()) == plans[0]
    plans_file = tmp_path / "plans.json"
    save_plans(plans_file, plans, all_units(plans), num_tasks=3)
    tasks = [Launch([sys.executable, "-m", "launcher.slurm.prepare", "--script", "unused", "--write-shards",
                     str(plans_file)], {**os.environ, "SLURM_ARRAY_TASK_ID": str(task)}, cwd=tmp_path)
             for task in (2, 1, 0)]  # from another directory, last chunk first, at once
    for task in tasks:
        code = task.finish()
        output = task.output
        assert code == 0, output[-3000:]
    assert not (tmp_path / "split" / "meta.json").exists()  # only finalize writes it
    finalize(plans[0])
    assert files_of(tmp_path / "split") == files_of(reference)
    stamps = stamps_of(tmp_path / "split")
    assert _plans(corpus, cache, tmp_path / "split") == []  # a rerun: nothing left to plan or write
    assert stamps_of(tmp_path / "split") == stamps


def test_finalize_waits_for_every_shard_and_a_resumed_plan_schedules_only_the_missing(case, tmp_path):
    corpus, cache, reference = case
    out = tmp_path / "resumed"
    plans = _plans(corpus, cache, out)
    units = all_units(plans)
    missing = units[2]
    write_units(plans, [u for u in units if u != missing])  # a task killed before its shard
    stray = out / f".shard-{missing[1]:05d}.bin.x.tmp"
    stray.write_bytes(b"half")  # ...or in the middle of writing it, long ago
    os.utime(stray, (time.time() - 2 * STALE_TEMP_S,) * 2)
    writing = out / f".shard-{missing[1]:05d}.json.y.tmp"  # another node's writer of that shard, at work now
    writing.write_bytes(b"{")
    with pytest.raises(UserInputError, match=f"shard {missing[1]} of {len(units)} is incomplete"):
        finalize(plans[0])
    written = stamps_of(out)
    plans = _plans(corpus, cache, out)  # the resubmission plans again
    assert incomplete_units(plans) == [missing]
    write_units(plans, incomplete_units(plans))
    finalize(plans[0])
    assert writing.exists()  # not pulled from under its writer, which renames it when done
    writing.unlink()
    assert files_of(out) == files_of(reference)  # the stray temp file is gone too
    assert all(stamps_of(out)[name] == stamp for name, stamp in written.items() if not name.startswith("."))


def test_chunks_cover_every_shard_once_in_order_and_balanced():
    units = [(p, s) for p in range(3) for s in range(7)]
    for tasks in (1, 2, 5, 21):
        chunks = [chunk(units, tasks, t) for t in range(tasks)]
        assert [u for c in chunks for u in c] == units
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_slurm_settings_passed_on_and_task_counts():
    env = {"SLURM_JOB_PARTITION": "cpu", "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_ACCOUNT": ""}
    assert inherited_options(env) == ["--partition=cpu", "--cpus-per-task=4"]
    assert num_tasks(7, {}) == 7 and num_tasks(5000, {}) == 1000 and num_tasks(7, {"BIGMODEL_PREPARE_TASKS": "3"}) == 3
    with pytest.raises(UserInputError, match="BIGMODEL_PREPARE_TASKS"):
        num_tasks(7, {"BIGMODEL_PREPARE_TASKS": "0"})


def test_ray_addresses_that_cannot_work_are_one_line_errors(tmp_path, cli_env):
    args = ["prepare", TINY_CONFIG, f"--output_dir={tmp_path}"]
    assert_one_line_error(run_cli([*args, "--address=127.0.0.1:6379"], cwd=REPO, env=cli_env), "--on ray")
    dashboard = run_cli([*args, "--on=ray", "--address=http://127.0.0.1:8265"], cwd=REPO, env=cli_env)
    assert_one_line_error(dashboard, "dashboard", "ray job submit")
