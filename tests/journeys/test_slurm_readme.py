"""`sbatch slurm/pretrain_gpt.sh CONFIG` as the README prints it, from a fresh clone's root, on the real
local Slurm cluster: no --output_dir (the run lands in the submit directory's `runs/`), through its
first checkpoint, a preemption (the time-limit warning `--signal=B:USR1`), the requeue and the end.

The cluster's nodes have 2 (fake) GPUs each, so the node and GPU counts of the README's line become the
cluster's; the step counts are added. Everything else is as printed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bigmodel_dist.metrics.jsonl import read_metrics
from tests.helpers.slurm_jobs import job_field, wait_for_job
from tests.helpers.waiting import wait_until
from tests.journeys.fresh_clone import fresh_clone, user_env

pytestmark = pytest.mark.distributed
EVERY, STEPS = 5, 20


def _written_while_running(path: Path, job: str) -> bool:
    """Whether `path` exists; fails once the job has left its running states without writing it."""
    if path.exists():
        return True
    assert job_field(job, "JobState") in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} ended before {path}"
    return False


def _prepare_job(clone: Path) -> str:
    """`sbatch slurm/prepare.sh CONFIG` as slurm/README.md prints it (partition and task count left to the
    script's defaults), from the clone's root: its first job plans and submits the array and the finalize."""
    submitted = subprocess.run(["sbatch", "--parsable", "slurm/prepare.sh", "configs/gpt2-tiny.yaml"], cwd=clone,
                               env=user_env(), capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def _check_prepared(clone: Path, plan_job: str) -> None:
    assert wait_for_job(plan_job) == "COMPLETED"
    log = (clone / f"slurm-bigmodel-prepare-{plan_job}.out").read_text()  # its own --output, relative
    final = re.search(r"array job \d+, finalize job (\d+)", log)
    assert final, log[-3000:]
    assert wait_for_job(final[1]) == "COMPLETED", log[-3000:]
    (meta,) = (clone / "runs" / ".cache").glob("prepared-*/meta.json")  # under the submit dir's `runs`
    assert json.loads(meta.read_text())["num_train_sequences"] > 0


def test_sbatch_as_printed_saves_is_preempted_requeued_and_finishes(slurm_cluster, tmp_path):
    """With slurm/prepare.sh from another clone at the same time (the cluster has a CPU to spare per node)."""
    preparing = fresh_clone(tmp_path / "prepare-clone")
    plan_job = _prepare_job(preparing)
    clone = fresh_clone(tmp_path / "clone")
    command = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=1", "slurm/pretrain_gpt.sh",
               "configs/gpt2-tiny.yaml", f"--train.max_steps={STEPS}", f"--checkpoint.every={EVERY}"]
    submitted = subprocess.run(command, cwd=clone, env=user_env(), capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    run_dir = clone / "runs" / "gpt2-tiny"
    log_file = clone / f"slurm-bigmodel-pretrain-{job}.out"  # the script's own --output, in the submit dir

    first_checkpoint = run_dir / "checkpoints" / f"step_{EVERY:08d}" / "bigmodel_meta.json"
    wait_until(lambda: _written_while_running(first_checkpoint, job), "the first checkpoint", interval=0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # what --signal=B:USR1@300 sends
    state = wait_for_job(job)
    log = log_file.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert job_field(job, "Restarts") == "1", log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    stopped = json.loads((run_dir / "STOPPED").read_text())
    assert EVERY <= stopped["step"] < STEPS
    assert re.search(rf"batch: exit 85; requeueing job {job} \(restart 0\)", log), log[-4000:]
    assert f"job {job} (restart 1)" in log and f"resumed from {run_dir / 'checkpoints'}" in log, log[-4000:]
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == STEPS
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "bigmodel_meta.json").read_text())
    assert meta["world_size"] == 2  # one rank on each node
    history = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in history.restarts] == [stopped["step"]]
    logged = history.series("loss")[0]  # every log_every steps, and the resume's first
    assert logged == sorted(set(logged)) and logged[-1] == STEPS, logged
    _check_prepared(preparing, plan_job)
