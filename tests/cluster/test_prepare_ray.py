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
import sys
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import GCS_PORT, netns_prefix
from tests.helpers.commands import TINY_CONFIG, cli_command, run_cli
from tests.helpers.launching import Launch
from tests.helpers.prepare_cases import files_of, make_corpus, overrides, prepare_locally, stamps_of
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.distributed
HELD_SHARD = 3


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _write_end_once_read(fifo: Path) -> list[int]:
    """[the write end of `fifo`] once some process has opened it to read it, else []."""
    try:
        return [os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)]
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
            raise
        return []


def _open_for_writing_once_read(fifo: Path, job: Launch) -> int:
    """Block until some process opens `fifo` to read it; our write end (kept open, nothing written)
    then holds that reader in its read."""
    (fd,) = wait_until(lambda: _write_end_once_read(fifo), f"a task reading {fifo.name}", alive=[job])
    return fd


def _holder_of(path: Path) -> int | None:
    """The process (other than this one) with `path` open, if any."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if str(path) in links:
            return int(pid)
    return None


def _reader_of(path: Path) -> int:
    """The process (other than this one) with `path` open."""
    return wait_until(lambda: _holder_of(path), f"a process holding {path} open")


def test_ray_tasks_write_the_local_bytes_survive_a_killed_worker_and_a_rerun_does_nothing(ray_cluster, tmp_path):
    corpus, cache = make_corpus(tmp_path / "corpus"), tmp_path / "cache"
    reference = prepare_locally(corpus, cache, tmp_path / "reference")
    out = tmp_path / "on-ray"
    out.mkdir()
    fifo = out / f"shard-{HELD_SHARD:05d}.json"
    os.mkfifo(fifo)
    command = [*netns_prefix(), *cli_command(["prepare", TINY_CONFIG, "--on=ray", f"--address=127.0.0.1:{GCS_PORT}",
                                              *overrides(corpus, cache, out)])]
    job = Launch(command, _env())
    held = _open_for_writing_once_read(fifo, job)
    victim = _reader_of(fifo)
    assert "ray::write_shards_task" in Path(f"/proc/{victim}/cmdline").read_text()  # a Ray worker, in its task
    fifo.unlink()  # the retry finds no sidecar and writes the shard
    os.kill(victim, signal.SIGKILL)
    os.close(held)
    code = job.finish()
    output = job.output
    assert code == 0, output[-6000:]
    assert "task will be retried" in output, output[-6000:]  # Ray saw the worker die and ran the task again
    assert files_of(out) == files_of(reference)  # every shard, sidecar, tokenizer file and meta.json

    stamps = stamps_of(out)
    again = run_cli(["prepare", TINY_CONFIG, "--on=ray", f"--address=127.0.0.1:{GCS_PORT}",
                     *overrides(corpus, cache, out)], env=_env(), prefix=netns_prefix())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do on Ray" in again.stderr
    assert stamps_of(out) == stamps
