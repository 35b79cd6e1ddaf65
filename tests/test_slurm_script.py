"""slurm/pretrain_gpt.sh without a cluster: stand-ins for `srun` and `scontrol` on PATH, the real
pre-flight. The requeue decision follows the config's `checkpoint.requeue_exit_code`, never a number
of the script's own. (The real thing on a local Slurm cluster: tests/test_slurm.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY
from .guards import HANG_GUARD_S

SCRIPT = REPO / "slurm" / "pretrain_gpt.sh"
JOB_ID = "4242"

# The training step exits with $FAKE_STEP_EXIT; scontrol answers the node list and records requeues.
FAKE_SRUN = '#!/usr/bin/env bash\necho "srun $*" >> "$FAKE_CALLS"\nexit "$FAKE_STEP_EXIT"\n'
FAKE_SCONTROL = ('#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_CALLS"\n'
                 '[[ "$1 $2" == "show hostnames" ]] && echo n1\nexit 0\n')


def _run_script(tmp_path: Path, step_exit: int, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The batch script as Slurm would start it on a one-node allocation; returns the fakes' calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    hook = tmp_path / "env_hook.sh"
    hook.write_text("")  # this interpreter is already first on PATH
    python_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{python_dir}{os.pathsep}{os.environ['PATH']}",
           "BIGMODEL_ENV_HOOK": str(hook), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": JOB_ID,
           "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "BIGMODEL_NPROC_PER_NODE": "1",
           "FAKE_CALLS": str(calls), "FAKE_STEP_EXIT": str(step_exit)}
    env.pop("SLURM_RESTART_COUNT", None)
    result = subprocess.run(["bash", str(SCRIPT), str(REPO / "configs" / "gpt2-tiny.yaml"), *TINY,
                             f"--output_dir={tmp_path / 'runs'}", *overrides],
                            env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    return result, calls.read_text().splitlines()


@pytest.mark.parametrize(("step_exit", "requeued"), [(86, True), (85, False)])
def test_the_script_requeues_on_the_configs_code(tmp_path, step_exit, requeued):
    result, calls = _run_script(tmp_path, step_exit, "--checkpoint.requeue_exit_code=86")
    assert result.returncode == step_exit, result.stderr[-3000:]
    assert any(call.startswith("srun ") for call in calls), calls
    assert (f"scontrol requeue {JOB_ID}" in calls) == requeued, (calls, result.stderr[-3000:])


def test_a_refused_config_stops_the_script_before_srun(tmp_path):
    result, calls = _run_script(tmp_path, 0, "--checkpoint.requeue_exit_code=oops")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bigmodel: error: config field checkpoint.requeue_exit_code" in result.stderr
    assert not any(call.startswith(("srun ", "scontrol requeue")) for call in calls), calls
