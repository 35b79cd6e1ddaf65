"""A person's own ways of stopping a run under `bigmodel launch local`, each ending in a defined state:
Ctrl-C saves and the same command resumes exactly; a second Ctrl-C ends at once; a closed terminal
(SIGHUP) saves and leaves no worker without its supervisor; a second live launch of a run is refused
and a dead holder's lease taken over; no launcher exits 0 for workers that failed. (scancel and
preemption under Slurm: tests/cluster/test_slurm.py.)
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bigmodel_dist.core.errors import EXIT_RUN_FAILED, UserInputError
from bigmodel_dist.core.run_dir import RunDir
from tests.conftest import RESUME_RUN, RESUME_STEPS
from tests.helpers.commands import assert_one_line_error, run_command
from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.launching import Launch, launch_local_command, losses, wait_for_step
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.distributed


def _command(tmp_path: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    return launch_local_command(*RESUME_RUN, f"--output_dir={tmp_path}", f"--data.cache_dir={data_cache}",
                                f"--name={name}", "--deepspeed.config=zero2", *extra)


def _processes_of(tmp_path: Path) -> list[int]:
    """Live processes whose command line names this test's folder (launcher, torchrun, workers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def test_ctrl_c_saves_and_the_same_command_resumes_exactly(tmp_path, data_cache, cli_env, straight_losses):
    command = _command(tmp_path, data_cache, "ctrl-c")
    run_dir = tmp_path / "ctrl-c"
    launch = Launch(command, cli_env)
    wait_for_step(launch, run_dir / "metrics.jsonl", 3)
    launch.signal(signal.SIGINT)  # what the terminal sends (torchrun and the workers have sessions of their own)
    assert launch.finish() == 130, launch.output[-4000:]
    stopped = json.loads((run_dir / "STOPPED").read_text())
    assert f"Ctrl-C (SIGINT): stopped at step {stopped['step']} and saved; the same command resumes from there " \
           "(exit 130)" in launch.output, launch.output[-4000:]
    assert "Traceback" not in launch.output and "KeyboardInterrupt" not in launch.output, launch.output[-6000:]
    assert _checkpoints(run_dir) == [f"step_{stopped['step']:08d}"]
    resumed = run_command(command, env=cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == straight_losses(2)  # bit-exact, as every stop-and-resume


def test_a_second_ctrl_c_ends_the_run_at_once_without_tracebacks(tmp_path, data_cache, cli_env):
    launch = Launch(_command(tmp_path, data_cache, "twice"), cli_env)
    wait_for_step(launch, tmp_path / "twice" / "metrics.jsonl", 2)
    launch.signal(signal.SIGINT)
    launch.wait_for_line(r"SIGINT: stopping at the next step")  # (two signals sent at once merge into one)
    launch.signal(signal.SIGINT)
    assert launch.finish() == 130, launch.output[-4000:]
    assert "ended at once by a second Ctrl-C: nothing saved since " in launch.output, launch.output[-4000:]
    assert "Traceback" not in launch.output, launch.output[-6000:]
    assert _processes_of(tmp_path) == []  # torchrun and the workers ended with it
    again = run_command(_command(tmp_path, data_cache, "twice"), env=cli_env)  # the same command: resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "twice" / "COMPLETED").read_text())["step"] == RESUME_STEPS


def test_a_closed_terminal_saves_and_leaves_no_worker_unsupervised(tmp_path, data_cache, cli_env):
    """SIGHUP, then the terminal is gone: its end of the output pipe closes (writes fail with EPIPE)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(_command(tmp_path, data_cache, "hangup"), env=cli_env, stdout=write_end,
                            stderr=write_end, start_new_session=True)
    os.close(write_end)
    shown: list[bytes] = []
    hung_up = threading.Event()

    def terminal() -> None:  # reads what the run prints until the terminal closes
        while not hung_up.is_set():
            if select.select([read_end], [], [], 0.1)[0]:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return
                shown.append(chunk)

    reader = threading.Thread(target=terminal, daemon=True)
    reader.start()
    run_dir = tmp_path / "hangup"
    try:
        wait_until(lambda: _last_step(run_dir / "metrics.jsonl") >= 3, "step 3 logged", alive=[proc])
    except AssertionError as exc:  # with what the terminal showed (the run's output is our pipe, read above)
        raise AssertionError(f"{exc}:\n{b''.join(shown)[-4000:].decode()}") from None
    os.killpg(proc.pid, signal.SIGHUP)  # the terminal's session leader is gone: its process group hears it
    hung_up.set()
    reader.join()
    os.close(read_end)
    assert proc.wait(timeout=HANG_GUARD_S) == 129
    stopped = json.loads((run_dir / "STOPPED").read_text())
    assert _checkpoints(run_dir) == [f"step_{stopped['step']:08d}"]
    (launch_log,) = (run_dir / "logs").glob("launch-*.log")  # the launcher's log outlives the terminal
    assert f"terminal closed (SIGHUP): stopped at step {stopped['step']} and saved" in launch_log.read_text()
    assert _processes_of(tmp_path) == []


def test_one_live_launch_per_run_and_a_dead_holders_lease_is_taken_over(tmp_path, data_cache, cli_env):
    command = _command(tmp_path, data_cache, "leased")
    first = Launch(command, cli_env)
    wait_for_step(first, tmp_path / "leased" / "metrics.jsonl", 2)
    second = run_command(command, env=cli_env)  # a user's second terminal, the same command
    assert_one_line_error(second, f"run dir {tmp_path / 'leased'}: in use by a live launch, host ",
                          f"pid {first.proc.pid} since ")
    assert first.finish() == 0, first.output[-4000:]
    assert json.loads((tmp_path / "leased" / "COMPLETED").read_text())["step"] == RESUME_STEPS
    assert not (tmp_path / "leased" / "LEASE").exists()  # released at the end

    # A launcher killed with SIGKILL leaves its lease: the next launch takes it over and runs.
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = tmp_path / "leased" / "LEASE"
    lease.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "pid_start": "1", "since": 0,
                                 "launch": "killed", "slurm_job": None}))
    more = run_command(_command(tmp_path, data_cache, "leased", f"--train.max_steps={RESUME_STEPS + 2}"), env=cli_env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"taking over the lease of host {os.uname().nodename} pid {dead.pid}" in more.stderr
    assert "(its process is gone)" in more.stderr and not lease.exists()


def test_a_requeued_slurm_attempt_waits_for_its_previous_attempt_to_let_go(tmp_path, monkeypatch):
    """The same Slurm job id: the old attempt (a live process holding the lease) is still ending."""
    from launcher.lease import Lease

    run_dir = RunDir(tmp_path / "run")
    released = tmp_path / "release-now"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib; from bigmodel_dist.core.run_dir import RunDir; "
                         "from launcher.lease import Lease; lease = Lease.take(RunDir(pathlib.Path(sys.argv[1])), 'old'); "
                         "print('held', flush=True); "
                         "[time.sleep(0.05) for _ in iter(lambda: pathlib.Path(sys.argv[2]).exists(), True)]; "
                         "lease.release()", str(run_dir.path), str(released)],
        env={**os.environ, "SLURM_JOB_ID": "77"}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    taken: list[Lease] = []
    taker = threading.Thread(target=lambda: taken.append(Lease.take(run_dir, "new")))
    taker.start()
    taker.join(timeout=1.0)  # not a deadline on speed: while the old attempt holds it, it waits
    assert not taken and holder.poll() is None
    released.touch()
    taker.join(timeout=HANG_GUARD_S)
    assert taken and json.loads(run_dir.lease.read_text())["launch"] == "new"
    assert holder.wait(timeout=HANG_GUARD_S) == 0
    taken[0].release()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job on the same run: refused at once
    other = subprocess.Popen([sys.executable, "-c", "import sys, pathlib; from bigmodel_dist.core.run_dir import RunDir; "
                              "from launcher.lease import Lease; Lease.take(RunDir(pathlib.Path(sys.argv[1])), 'x'); "
                              "print('held', flush=True); sys.stdin.read()", str(run_dir.path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "SLURM_JOB_ID": "79"})
    assert other.stdout.readline().strip() == "held"
    with pytest.raises(UserInputError, match="in use by a live launch"):
        Lease.take(run_dir, "y")
    other.communicate("")


def test_the_exit_code_never_borrows_another_launchs_marker(tmp_path):
    """The marker a launch reads is its own: a COMPLETED another launch of the run just wrote (newer than
    this one's start) does not turn this launch's failed workers into a success."""
    from launcher.flow import LaunchEnd, Markers, exit_code

    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.completed.write_text(json.dumps({"step": 15, "finished_at": time.time(), "launch": "the-other-one"}))
    config = SimpleNamespace(checkpoint=SimpleNamespace(requeue_exit_code=85),
                             resilience=SimpleNamespace(hang_exit_code=86))

    def code(workers_code: int) -> int:  # as `launch local` derives it, from this launch's markers only
        return exit_code(LaunchEnd(run_dir, workers_code, Markers.of_launch(run_dir, "mine")), config)

    assert code(1) == 1
    assert code(0) == EXIT_RUN_FAILED
    run_dir.completed.write_text(json.dumps({"step": 15, "finished_at": time.time(), "launch": "mine"}))
    assert code(1) == 0  # an abort after the end
