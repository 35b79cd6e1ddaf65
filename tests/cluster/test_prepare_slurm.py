"""`sbatch slurm/prepare.sh` on the real local Slurm cluster: a job array writes the shards, a finalize job
that depends on it writes meta.json, and the result is byte for byte the single-machine one.

One array task fails in the middle of its chunk (its next shard's path is a directory, so writing it
fails: no fault hook); the finalize job is then cancelled by Slurm and no meta.json appears. Submitting
again writes only the shards still missing; a third submission finds nothing to do and submits nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from bigmodel_dist.data.prepare_plan import chunk
from tests.conftest import REPO
from tests.helpers.commands import TINY_CONFIG
from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.prepare_cases import files_of, make_corpus, overrides, prepare_locally, stamps_of
from tests.helpers.slurm_jobs import DONE
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.distributed
TASKS = 2


def _states(job: str) -> list[str]:
    """JobState of the job, or of every task of an array job."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.findall(r"\bJobState=(\S+)", shown)


def _wait(job: str) -> list[str]:
    """The states of the job (of every task of an array job) once all have ended."""
    try:
        return wait_until(lambda: (states := _states(job)) and all(s in DONE for s in states) and states,
                          f"the end of job {job}", interval=1)
    except AssertionError as exc:
        subprocess.run(["scancel", job])  # our own job only
        raise AssertionError(f"{exc}: still {_states(job)}") from None


def _submit(tmp_path: Path, env: dict[str, str], corpus: Path, cache: Path, out: Path) -> tuple[str, str]:
    """sbatch the first job and wait for it; its log."""
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/plan-%j.out", "slurm/prepare.sh",
                                TINY_CONFIG, *overrides(corpus, cache, out)], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=HANG_GUARD_S)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    log = tmp_path / f"plan-{job}.out"
    assert _wait(job) == ["COMPLETED"], log.read_text()[-3000:]
    return job, log.read_text()


def _submitted_jobs(log: str) -> tuple[str, str]:
    match = re.search(r"array job (\d+), finalize job (\d+)", log)
    assert match, log[-3000:]
    return match[1], match[2]


def test_job_array_writes_the_local_bytes_resumes_after_a_failed_task_and_reruns_idle(slurm_cluster, tmp_path,
                                                                                      cli_env):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    reference = prepare_locally(corpus, cache, tmp_path / "reference")
    num_shards = len(list(reference.glob("shard-*.bin")))
    units = [(0, s) for s in range(num_shards)]
    second_chunk = [s for _, s in chunk(units, TASKS, 1)]
    assert len(second_chunk) >= 2
    blocked = second_chunk[1]  # task 1 writes one shard, then fails
    out = tmp_path / "on-slurm"
    (out / f"shard-{blocked:05d}.bin").mkdir(parents=True)
    env = {**cli_env, "BIGMODEL_PREPARE_TASKS": str(TASKS)}

    _, log = _submit(tmp_path, env, corpus, cache, out)
    array, final = _submitted_jobs(log)
    assert sorted(_wait(array)) == ["COMPLETED", "FAILED"]
    assert _wait(final) == ["CANCELLED"]  # afterok never satisfied: Slurm cancels it
    assert not (out / "meta.json").exists()
    written = stamps_of(out)
    assert {f"shard-{s:05d}.json" for s in range(num_shards) if s < blocked} <= set(written)

    (out / f"shard-{blocked:05d}.bin").rmdir()
    _, log = _submit(tmp_path, env, corpus, cache, out)
    assert f": {num_shards - blocked} shard(s) of 1 folder(s) to write" in log  # only the missing ones
    array, final = _submitted_jobs(log)
    logs = Path(re.search(r"plans (\S+):", log)[1]).parent
    assert _wait(final) == ["COMPLETED"], (logs / f"finalize-{final}.out").read_text()[-3000:]
    assert files_of(out) == files_of(reference)
    assert all(stamps_of(out)[name] == stamp for name, stamp in written.items())  # kept, not rewritten

    stamps = stamps_of(out)
    _, log = _submit(tmp_path, env, corpus, cache, out)
    assert "prepared data complete: nothing to submit" in log
    assert stamps_of(out) == stamps
