"""Stop and resume equals straight: a run stopped by a signal at any moment and restarted gives the same
per-step losses as the uninterrupted run.

Real DeepSpeed engines under `bigmodel launch local` (torchrun, 2 processes, gloo). A stop signal to the
launcher is remembered from its first second on and reaches the workers through a stop file; they agree
on a stop step, save what is new, and the launcher exits with the requeue code (85); a new process group
resumes and finishes. Bit-exact on CPU. The straight reference is shared (conftest.straight_losses).
"""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import RESUME_RUN, RESUME_STEPS
from tests.helpers.launching import Launch, launch_local_command, losses, wait_for_step

pytestmark = pytest.mark.distributed
REQUEUE = 85  # checkpoint.requeue_exit_code


def _launch(tmp_path, data_cache, env) -> Launch:
    return Launch(launch_local_command(*RESUME_RUN, f"--output_dir={tmp_path}", f"--data.cache_dir={data_cache}",
                                       "--name=stopped", "--deepspeed.config=zero2"), env)


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").exists() else []


# Where each stop lands, found by what the run prints (never by a sleep), and what must follow.
START_UP_POINTS = [
    # (what is going on, the line that tells us, signal)
    ("launcher checks: data, before torchrun", r"launcher\.local\.launch: config checked", signal.SIGTERM),
    # The workers learn of it from the launcher's stop file, wherever in their start-up they are; one
    # point of theirs stands for all (the same agreement before the first step decides).
    ("worker start-up: data, model, DeepSpeed engine", r"process group ready", signal.SIGUSR1),
]


def test_stops_from_the_first_second_to_shutdown_each_requeue_and_resume_equals_straight_run(
        tmp_path, data_cache, cli_env, straight_losses):
    """One run (ZeRO-2) stopped at every point in turn; each stop exits 85 without a traceback, saves only
    what is new, and the run that finally completes logged the straight run's losses, each step once.
    The straight reference (unless another test already ran it) runs alongside: the stops wait on lines
    of their own run, which the reference only slows."""
    expected = ThreadPoolExecutor(1).submit(straight_losses, 2)
    run_dir = tmp_path / "stopped"
    for what, line, signum in START_UP_POINTS:
        launch = _launch(tmp_path, data_cache, cli_env)
        launch.wait_for_line(line)
        launch.signal(signum)
        assert launch.finish() == REQUEUE, f"{what}:\n{launch.output[-3000:]}"
        assert "Traceback" not in launch.output, what
        assert _checkpoints(run_dir) == [], what  # nothing trained yet: nothing to save
    assert not (run_dir / "metrics.jsonl").exists() or "loss" not in (run_dir / "metrics.jsonl").read_text()

    # During a save: a second signal while the stop checkpoint is being written changes nothing.
    launch = _launch(tmp_path, data_cache, cli_env)
    wait_for_step(launch, run_dir / "metrics.jsonl", 3)
    launch.signal(signal.SIGUSR1)
    launch.wait_for_line(r"stopping for signal")
    launch.signal(signal.SIGTERM)
    assert launch.finish() == REQUEUE, launch.output[-3000:]
    assert "Traceback" not in launch.output
    (stop_checkpoint,) = _checkpoints(run_dir)  # exactly one: the stop checkpoint (checkpoint.every=0)
    stop_step = int(stop_checkpoint.split("_")[1])
    assert 3 <= stop_step < RESUME_STEPS
    meta = json.loads((run_dir / "checkpoints" / stop_checkpoint / "bigmodel_meta.json").read_text())
    assert meta["train_state"]["stop_reason"] == "signal" and meta["train_state"]["samples_seen"] == stop_step * 8
    assert {f"random_states_{r}.pkl" for r in range(2)} <= set(meta["files"])  # both ranks saved at that step
    assert json.loads((run_dir / "STOPPED").read_text())["step"] == stop_step

    # At shutdown: the run completed and saved its last step, then was asked to stop: requeue, and the
    # requeued run finds nothing left to do.
    launch = _launch(tmp_path, data_cache, cli_env)
    launch.wait_for_line(r"done: checkpoints in")
    launch.signal(signal.SIGTERM)
    assert launch.finish() == REQUEUE, launch.output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / stop_checkpoint} at step {stop_step}" in launch.output
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == RESUME_STEPS
    last = _launch(tmp_path, data_cache, cli_env)
    assert last.finish() == 0, last.output[-3000:]
    assert _checkpoints(run_dir)[-1] == f"step_{RESUME_STEPS:08d}"
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
    assert resumed == expected.result()
