"""The local test cluster itself: two nodes that know each other by name, and two fake GPUs per node."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.waiting import wait_until

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _sbatch(*args: str) -> subprocess.CompletedProcess:
    command = ["sbatch", "--parsable", "--time=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S)


def _state(job_id: str) -> str:
    shown = subprocess.check_output(["scontrol", "show", "job", job_id], text=True)
    return re.search(r"JobState=(\S+)", shown)[1]


def _wait(job_id: str, timeout: float = HANG_GUARD_S) -> str:
    """Poll `scontrol show job` (there is no sacct) until the job has finished; return its state."""
    try:
        return wait_until(lambda: (state := _state(job_id)) in FINISHED and state, f"the end of job {job_id}",
                          interval=0.5, guard=timeout)
    except AssertionError as exc:
        subprocess.run(["scancel", job_id], check=False)  # ours
        raise AssertionError(f"{exc}: still {_state(job_id)}") from None


def test_two_node_job_runs_on_n1_and_n2(slurm_cluster, tmp_path: Path):
    script = tmp_path / "two_nodes.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"\n'
        "srun hostname\n"
    )
    out = tmp_path / "two_nodes.out"
    submitted = _sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={out}", str(script))
    assert submitted.returncode == 0, submitted.stderr
    state = _wait(submitted.stdout.strip())
    lines = out.read_text().split()
    assert state == "COMPLETED", lines
    assert lines[0] == "MASTER_ADDR=n1"
    assert sorted(lines[1:]) == ["n1", "n2"]  # srun ran one task on each node


def test_gpus_per_node_is_limited_to_two(slurm_cluster, tmp_path: Path):
    too_many = _sbatch("--gpus-per-node=3", "--wrap=true")
    assert too_many.returncode != 0
    assert "Requested node configuration is not available" in too_many.stderr

    out = tmp_path / "gpus.out"
    # both processes of a one-node job fit on one node, and each sees the node's two (fake) GPUs
    submitted = _sbatch("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", f"--output={out}",
                        "--wrap=srun printenv CUDA_VISIBLE_DEVICES")
    assert submitted.returncode == 0, submitted.stderr
    assert _wait(submitted.stdout.strip()) == "COMPLETED", out.read_text()
    assert out.read_text().split() == ["0,1", "0,1"]
