"""`bigmodel prepare --on ray` on a real local Ray cluster (loopback only): the Ray tasks write the bytes
of the single-machine path, a task whose worker is killed mid-run is retried by Ray, and a second run
touches nothing.

The kill lands at a chosen point without a fault hook or a sleep: a named pipe stands where one shard's
sidecar will be read, so the task that checks that shard blocks there; the test sees it open the pipe
(an event), kills that very process, and removes the pipe before Ray retries the task.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import GCS_PORT, netns_prefix
from tests.helpers.cli import TINY_CONFIG, cli_command, run_cli
from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.prepare_cases import files_of, make_corpus, overrides, prepare_locally, stamps_of

pytestmark = pytest.mark.distributed
HELD_SHARD = 3


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _open_for_writing_once_read(fifo: Path, job: subprocess.Popen) -> int:
    """Block until some process opens `fifo` to read it; our write end (kept open, nothing written)
    then holds that reader in its read."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert job.poll() is None, f"prepare ended before any task read {fifo.name}:\n{job.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no task opened {fifo} within {HANG_GUARD_S}s"
        time.sleep(0.05)


def _reader_of(path: Path) -> int:
    """The process (other than this one) with `path` open."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue
            if str(path) in links:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no process holds {path} open")


def test_ray_tasks_write_the_local_bytes_survive_a_killed_worker_and_a_rerun_does_nothing(ray_cluster, tmp_path):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    reference = prepare_locally(corpus, cache, tmp_path / "reference")
    out = tmp_path / "on-ray"
    out.mkdir()
    fifo = out / f"shard-{HELD_SHARD:05d}.json"
    os.mkfifo(fifo)
    command = [*netns_prefix(), *cli_command(["prepare", TINY_CONFIG, "--on=ray", f"--address=127.0.0.1:{GCS_PORT}",
                                              *overrides(corpus, cache, out)])]
    job = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    held = _open_for_writing_once_read(fifo, job)
    victim = _reader_of(fifo)
    assert "ray::write_shards_task" in Path(f"/proc/{victim}/cmdline").read_text()  # a Ray worker, in its task
    fifo.unlink()  # the retry finds no sidecar and writes the shard
    os.kill(victim, signal.SIGKILL)
    os.close(held)
    output, _ = job.communicate(timeout=HANG_GUARD_S)
    assert job.returncode == 0, output[-6000:]
    assert "task will be retried" in output, output[-6000:]  # Ray saw the worker die and ran the task again
    assert files_of(out) == files_of(reference)  # every shard, sidecar, tokenizer file and meta.json

    stamps = stamps_of(out)
    again = run_cli(["prepare", TINY_CONFIG, "--on=ray", f"--address=127.0.0.1:{GCS_PORT}",
                     *overrides(corpus, cache, out)], env=_env(), prefix=netns_prefix())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do on Ray" in again.stderr
    assert stamps_of(out) == stamps
