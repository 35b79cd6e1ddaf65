"""A checkpoint write that fails (a full disk) ends a two-rank run with one clear error, on a real small
filesystem: a size-limited tmpfs mounted for the test (CI runs as root)."""

from __future__ import annotations

import re

import pytest

from bigmodel_dist.checkpoint.integrity import check_files, read_checkpoint_meta, step_dirs
from bigmodel_dist.core.errors import EXIT_RUN_FAILED
from tests.conftest import TINY
from tests.helpers.commands import ERROR_PREFIX, run_command
from tests.helpers.launching import launch_local_command

# One checkpoint of the tiny model at ZeRO-2 is ~9.2 MiB (two ranks' optimizer shards, model states,
# tokenizer): the first fits in 14 MiB, the second cannot.
DISK_MIB = 14


@pytest.fixture
def small_disk(small_tmpfs):
    return small_tmpfs(DISK_MIB)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_full_disk_ends_the_run_with_one_error_naming_rank_path_and_cause(small_disk, data_cache, cli_env,
                                                                            async_save):
    run_dir = small_disk / "full"
    result = run_command(launch_local_command(
        *TINY, f"--output_dir={small_disk}", "--name=full", f"--data.cache_dir={data_cache}",
        "--train.max_steps=40", "--checkpoint.every=2", "--checkpoint.keep_last=3", "--train.eval_every=0",
        f"--checkpoint.async_save={str(async_save).lower()}"), env=cli_env)
    output = result.stdout + result.stderr
    shown = f"exit {result.returncode}\n{output[-6000:]}"

    # Ends with an error (not requeued: a full disk needs a person), not a wait or a success.
    assert result.returncode == EXIT_RUN_FAILED, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert errors, shown
    failed = errors[0]
    assert "rank " in failed and str(run_dir / "checkpoints") in failed and "no space left on device" in failed.lower(), shown
    assert "Traceback" not in output, shown
    ranks = [re.search(r"rank (\d+)", line) for line in errors]
    assert all(ranks) and len({m.group(1) for m in ranks if m}) == len(errors), shown  # at most one line per rank
    assert "Logging error" not in output and "unexpected pos" not in output, shown
    assert not (run_dir / "COMPLETED").exists() and not (run_dir / "STOPPED").exists()

    # It stopped within a step or two of the failing save (step 4: step 2's checkpoint fits, step 4's not).
    steps = [int(step) for step in re.findall(r"metrics\.logger: step (\d+) loss=", output)]
    assert steps and max(steps) <= 4 + 2, shown

    # What was committed before stays whole and is what `latest` names.
    committed = step_dirs(run_dir / "checkpoints")
    assert [p.name for p in committed] == ["step_00000002"], shown
    meta, problem = read_checkpoint_meta(committed[0])
    assert problem is None and check_files(committed[0], meta["files"], sorted(meta["files"])) is None
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"

