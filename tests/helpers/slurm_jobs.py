"""A Slurm job as the tests on the local test cluster watch it (tests/cluster/README.md): no accounting
database there, so no sacct; `scontrol show job` tells a job's fields while Slurm remembers it."""

from __future__ import annotations

import re
import subprocess

from tests.helpers.waiting import wait_until

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_field(job: str, field: str) -> str:
    """One field of `scontrol show job` ("" when it does not show one)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for_job(job: str) -> str:
    """The job's state once it has ended (one of DONE). Past the hang guard the job is cancelled (our own
    job only) and the test fails."""
    try:
        return wait_until(lambda: (state := job_field(job, "JobState")) in DONE and state, f"the end of job {job}",
                          interval=1)
    except AssertionError as exc:
        subprocess.run(["scancel", job])
        raise AssertionError(f"{exc}: still {job_field(job, 'JobState')}") from None
