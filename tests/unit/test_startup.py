"""A process from its first line: stop requests remembered, start-up timed, only the needed ops built.

The end-to-end cases (a stop at each point of start-up, a save and shutdown, then a resume equal to the
straight run) are in tests/distributed/test_resume.py.
"""

from __future__ import annotations

import os
import signal
import threading

from bigmodel_dist.ft.preemption import DEFAULT_STOP_SIGNALS, StopSignals
from launcher.warmup import ops_to_build


def test_a_stop_signal_is_recorded_not_fatal_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    signals = StopSignals(("SIGUSR1",))
    assert signals.received is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.received == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGUSR1)  # a second one keeps the first reason
    assert signals.received == "SIGUSR1"
    signals.close()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_watch_follows_the_configs_list():
    signals = StopSignals()
    assert signals.watched == sorted(DEFAULT_STOP_SIGNALS)
    signals.watch(["SIGUSR2"])  # checkpoint.stop_signals: [SIGUSR2]
    assert signals.watched == ["SIGUSR2"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # no longer ours
    signals.close()


def test_a_launchers_stop_file_counts_as_a_request(tmp_path):
    stop_file = tmp_path / "stop"
    signals = StopSignals((), stop_file=str(stop_file))
    assert signals.received is None
    stop_file.touch()
    assert signals.received == "stop file"


def test_a_signal_sent_while_blocked_waits_for_the_handler():
    """`launch local` starts torchrun with SIGUSR1 blocked; a worker signalled before its handler exists
    gets the signal once the handler is installed (it unblocks)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        # To this thread: a process-wide kill could be taken by another of pytest's threads, unblocked
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # pending, not delivered
        signals = StopSignals(("SIGUSR1",))
        assert signals.received == "SIGUSR1"
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        signals.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def test_the_launcher_hook_runs_on_the_signal(tmp_path):
    stop_file = tmp_path / "stop"
    signals = StopSignals(("SIGUSR1",), on_signal=stop_file.touch)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop_file.exists() and signals.received == "SIGUSR1"
    signals.close()


def test_warmup_builds_only_the_ops_a_run_loads():
    assert ops_to_build(has_cuda=False, offload=False) == ["ShareMemCommBuilder"]  # CPU: torch's AdamW
    assert ops_to_build(has_cuda=True, offload=False) == ["FusedAdamBuilder"]
    assert ops_to_build(has_cuda=False, offload=True) == ["ShareMemCommBuilder", "CPUAdamBuilder"]


def test_the_rank_that_held_start_up_up_is_named():
    from bigmodel_dist.metrics.startup import slowest_rank_note

    rank0 = {"imports + config": 3.0, "process group": 55.0, "model + engine": 6.0}
    rank1 = {"imports + config": 57.0, "process group": 1.0, "model + engine": 6.1}
    note = slowest_rank_note([rank0, rank1])
    assert note and note.startswith("slowest start-up: rank 1 spent 57.0s in imports + config (rank 0: 3.0s)")
    even = {"imports + config": 3.4, "process group": 1.5, "model + engine": 6.0}
    assert slowest_rank_note([rank0 | {"process group": 1.4}, even]) is None  # noise is not news
