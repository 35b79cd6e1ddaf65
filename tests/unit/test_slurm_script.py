"""slurm/pretrain_gpt.sh without a cluster: stand-ins for `srun`, `scontrol` and `sinfo` on PATH, the
real pre-flight. The requeue decision follows the config's exit codes (requeue, hang, bad node), never
numbers of the script's own; the node health check runs first; a hang or a bad node is requeued
avoiding the suspect node when the partition has another. (The real thing: tests/cluster/test_slurm.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY
from tests.helpers.guards import HANG_GUARD_S

SCRIPT = REPO / "slurm" / "pretrain_gpt.sh"
JOB_ID = "4242"

# The health check step exits $FAKE_CHECK_EXIT (default 0), after sending $FAKE_CHECK_SIGNAL (if set) to
# the batch shell; the training step exits $FAKE_STEP_EXIT. A step that fails names $FAKE_SUSPECT (if
# set) in the suspects file, as `bigmodel check` or the hang watchdog would.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_CALLS"
echo "env NNODES=${NNODES:-}" >> "$FAKE_CALLS"
CODE=$FAKE_STEP_EXIT
if [[ "$*" == *"launcher.cli check"* ]]; then
    CODE=${FAKE_CHECK_EXIT:-0}
    echo "suspects file $BIGMODEL_SUSPECT_NODES_FILE" >> "$FAKE_CALLS"
    [[ -z "${FAKE_CHECK_SIGNAL:-}" ]] || kill -"$FAKE_CHECK_SIGNAL" "$PPID"   # to the batch shell
fi
if [[ $CODE -ne 0 && -n "${FAKE_SUSPECT:-}" ]]; then
    mkdir -p "$(dirname "$BIGMODEL_SUSPECT_NODES_FILE")" && echo "$FAKE_SUSPECT" >> "$BIGMODEL_SUSPECT_NODES_FILE"
fi
exit "$CODE"
"""
# scontrol answers the node list and the job (nothing excluded yet), and records requeues and updates;
# sinfo lists the partition's nodes and states from $FAKE_PARTITION ("n1 allocated;n2 idle").
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_CALLS"
[[ "$1 $2" == "show hostnames" ]] && echo n1
[[ "$1 $2" == "show job" ]] && echo "JobId=$3 JobName=x ExcNodeList=(null) NodeList=n1"
exit 0
"""
FAKE_SINFO = """#!/usr/bin/env bash
echo "sinfo $*" >> "$FAKE_CALLS"
tr ';' '\\n' <<< "${FAKE_PARTITION:-n1 allocated}"
"""


def _run_script(tmp_path: Path, step_exit: int, *overrides: str, **fake: str
                ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The batch script as Slurm would start it on a one-node allocation; returns the fakes' calls.
    `fake`: FAKE_CHECK_EXIT, FAKE_SUSPECT, FAKE_PARTITION for the stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sinfo", FAKE_SINFO)):
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
           "SLURM_JOB_PARTITION": "debug", "FAKE_CALLS": str(calls), "FAKE_STEP_EXIT": str(step_exit), **fake}
    env.pop("SLURM_RESTART_COUNT", None)
    result = subprocess.run(["bash", str(SCRIPT), str(REPO / "configs" / "gpt2-tiny.yaml"), *TINY,
                             f"--output_dir={tmp_path / 'runs'}", *overrides],
                            env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    return result, calls.read_text().splitlines()


@pytest.mark.parametrize(("step_exit", "requeued"), [(90, True), (85, False)])
def test_the_script_requeues_on_the_configs_code(tmp_path, step_exit, requeued):
    result, calls = _run_script(tmp_path, step_exit, "--checkpoint.requeue_exit_code=90")
    assert result.returncode == step_exit, result.stderr[-3000:]
    assert any(call.startswith("srun ") for call in calls), calls
    assert (f"scontrol requeue {JOB_ID}" in calls) == requeued, (calls, result.stderr[-3000:])


def test_the_health_check_runs_on_every_node_before_training(tmp_path):
    result, calls = _run_script(tmp_path, 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([call for call in calls if call.startswith("srun ")]) == 2, calls
    text = "\n".join(calls)  # an srun's `bash -c` script spans lines
    check = text[text.index("srun --ntasks-per-node=1"):text.index("launcher.cli launch local")]
    assert "launcher.cli check" in check and "--nnodes=" in check and '--master-port="$HEALTH_PORT"' in check, text
    suspects = tmp_path / "runs" / "gpt2-tiny" / "logs" / f"suspect-nodes-{JOB_ID}-0.txt"
    assert f"suspects file {suspects}" in calls  # per attempt, beside the job's log
    result, calls = _run_script(tmp_path, 0, "--resilience.health_check=false")
    assert [call for call in calls if "launcher.cli check" in call] == [], calls


def test_elastic_jobs_run_torchrun_over_a_node_range_and_survive_a_lost_node(tmp_path):
    result, calls = _run_script(tmp_path, 0, BIGMODEL_ELASTIC_MIN_NODES="1")
    assert result.returncode == 0, result.stderr[-3000:]
    (training,) = [call for call in calls if call.startswith("srun ") and "--no-kill" in call]
    assert "--kill-on-bad-exit=0" in training, calls  # a failed node's task ends alone
    assert "env NNODES=1:1" in calls and '--nnodes="$NNODES"' in "\n".join(calls), calls
    result, calls = _run_script(tmp_path, 0)  # not elastic: a fixed node count, Slurm's default kill
    assert "env NNODES=1" in calls and not any("--no-kill" in call for call in calls), calls


def test_a_bad_node_is_requeued_without_that_node(tmp_path):
    result, calls = _run_script(tmp_path, 0, FAKE_CHECK_EXIT="87", FAKE_SUSPECT="n1",
                                FAKE_PARTITION="n1 allocated;n2 idle;n3 drained")
    assert result.returncode == 87, result.stderr[-3000:]
    assert not any("launch local" in call for call in calls), calls  # no training on a bad node
    requeue = calls.index(f"scontrol requeue {JOB_ID}")
    assert calls[requeue + 1:] == [f"scontrol update JobId={JOB_ID} ExcNodeList=n1"], calls
    assert "suspect node(s) n1: the requeued job excludes n1" in result.stderr


def test_a_stop_during_the_health_check_requeues_without_training(tmp_path):
    result, calls = _run_script(tmp_path, 0, FAKE_CHECK_SIGNAL="USR1")
    assert result.returncode == 85, result.stderr[-3000:]
    assert not any("launch local" in call for call in calls) and f"scontrol requeue {JOB_ID}" in calls, calls
    assert "USR1 before training started" in result.stderr


@pytest.mark.parametrize("partition", ["n1 allocated", "n1 allocated;n2 down*"])
def test_a_hang_without_spare_nodes_is_requeued_on_the_same_nodes(tmp_path, partition):
    result, calls = _run_script(tmp_path, 86, FAKE_SUSPECT="n1", FAKE_PARTITION=partition)
    assert result.returncode == 86, result.stderr[-3000:]
    assert f"scontrol requeue {JOB_ID}" in calls and not any("ExcNodeList" in call for call in calls), calls
    assert "requeueing without excluding them" in result.stderr


def test_a_refused_config_stops_the_script_before_srun(tmp_path):
    result, calls = _run_script(tmp_path, 0, "--checkpoint.requeue_exit_code=oops")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bigmodel: error: config field checkpoint.requeue_exit_code" in result.stderr
    assert not any(call.startswith(("srun ", "scontrol requeue")) for call in calls), calls


def test_exclusions_add_up_and_spare_the_job_a_whole_suspect_allocation():
    from launcher.slurm.batch import choose_exclusion

    partition = {"n1": "allocated", "n2": "allocated", "n3": "idle", "n4": "idle~", "n5": "drained"}
    # an earlier attempt excluded n3; now n1 is suspect: both stay out, n2 and n4 (powered down) remain
    assert choose_exclusion(["n1"], ["n3"], ["n1", "n2"], partition, 2)[0] == ["n1", "n3"]
    # both nodes of a two-node job suspect: the job's fault, not the nodes'
    exclude, why = choose_exclusion(["n1", "n2"], [], ["n1", "n2"], partition, 2)
    assert exclude == [] and "every node of the job is suspect" in why
    assert choose_exclusion([], [], ["n1"], partition, 1)[0] == []
