"""The one exit code of a launch (`launcher/flow.py`), from what a launcher knows when its workers are gone:
every launcher (`launch local` under torchrun or the sbatch script, the Ray job's driver) derives it here."""

from __future__ import annotations

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.core.run_dir import RunDir
from launcher.flow import LaunchEnd, Markers, exit_code

CFG = load_config(None, [])
REQUEUE, HANG, INTERRUPT = CFG.checkpoint.requeue_exit_code, CFG.resilience.hang_exit_code, 130
DONE = {"step": 10, "stop_reason": None}
STOPPED = {"step": 6, "stop_reason": "signal"}


@pytest.mark.parametrize("what, end, code", [
    ("completed", dict(workers_code=0, markers=Markers(DONE, None)), 0),
    ("workers' 0 without this launch's marker", dict(workers_code=0, markers=Markers(None, None)), 1),
    ("nothing expected from workers that never trained", dict(workers_code=0, markers=Markers(None, None),
                                                              workers_write_markers=False), 0),
    ("a worker failed", dict(workers_code=1, markers=Markers(None, None)), 1),
    ("workers aborted in teardown after completing", dict(workers_code=1, markers=Markers(DONE, None)), 0),
    ("hung", dict(workers_code=None, markers=Markers(None, None)), HANG),
    ("hung shutting down after completing", dict(workers_code=None, markers=Markers(DONE, None)), 0),
    ("stopped by a signal, saved", dict(workers_code=0, markers=Markers(None, STOPPED), stop_asked="SIGUSR1"), REQUEUE),
    ("stopped on a worker (a drained node)", dict(workers_code=0, markers=Markers(None, STOPPED)), REQUEUE),
    ("a signal after the end: the requeued job finds the run complete",
     dict(workers_code=0, markers=Markers(DONE, None), stop_asked="SIGTERM"), REQUEUE),
    ("Ctrl-C, saved", dict(workers_code=0, markers=Markers(None, STOPPED), interrupted="SIGINT"), INTERRUPT),
    ("a second Ctrl-C", dict(workers_code=None, markers=Markers(None, None), interrupted="SIGINT",
                             ended_at_once=True), INTERRUPT),
    ("stopped to grow", dict(workers_code=0, markers=Markers(None, STOPPED), grow_request="grow from 1 to 2 workers"),
     REQUEUE),
    ("completed before the grow request took effect",
     dict(workers_code=0, markers=Markers(DONE, None), grow_request="grow from 1 to 2 workers"), 0),
])
def test_the_exit_code_of_every_way_a_launch_ends(tmp_path, what, end, code):
    assert exit_code(LaunchEnd(RunDir(tmp_path), **end), CFG) == code, what


def test_the_markers_are_this_launchs_only(tmp_path):
    """A COMPLETED left by an earlier or concurrent launch of the same run never makes this one look done."""
    run_dir = RunDir(tmp_path)
    run_dir.completed.write_text('{"step": 10, "launch": "earlier"}\n')
    assert Markers.of_launch(run_dir, "this") == Markers(None, None)
    assert Markers.of_launch(run_dir, "earlier").completed == {"step": 10, "launch": "earlier"}
