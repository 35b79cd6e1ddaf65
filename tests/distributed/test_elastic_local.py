"""Elastic training under torchrun: two `bigmodel launch local --nnodes 1:2` processes on this machine are
two "nodes" meeting at one c10d rendezvous. One node dies (SIGKILL to its launcher, torchrun and
worker); the other restarts its worker on the smaller world from the newest checkpoint and finishes,
with the same global batch and an exact data cursor."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bigmodel_dist.core.env import SAMPLE_LEDGER
from bigmodel_dist.data.ledger import samples_by_step
from bigmodel_dist.metrics.jsonl import read_metrics
from launcher.local.launch import child_pids
from launcher.ports import free_port
from tests.conftest import TINY
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, cli_command, run_cli
from tests.helpers.launching import Launch
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.distributed

STEPS, EVERY, BATCH = 16, 4, 8


def _tree(pid: int) -> list[int]:
    found, todo = [pid], [pid]
    while todo:
        for child in child_pids(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _listener_of(port: int) -> int | None:
    """The PID listening on TCP `port` (the rendezvous store's host), from /proc: no tool needed."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(fd.parts[2])
    return None


def _world_of(checkpoint: Path) -> int | None:
    try:
        return json.loads((checkpoint / "bigmodel_meta.json").read_text())["world_size"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_node_that_dies_leaves_and_the_other_finishes_at_the_smaller_size(tmp_path, data_cache, cli_env):
    port = free_port()
    command = cli_command(["launch", "local", TINY_CONFIG, "--nproc-per-node=1", "--nnodes=1:2",
                           f"--master-port={port}", "--rdzv-conf=last_call_timeout=20", *TINY,
                           f"--output_dir={tmp_path}", f"--data.cache_dir={data_cache}", "--name=elastic",
                           "--train.precision=fp32", f"--train.max_steps={STEPS}", f"--checkpoint.every={EVERY}",
                           "--train.eval_every=0", "--model.dropout=0.0", "--deepspeed.config=zero2"])
    run_dir = tmp_path / "elastic"
    env = {**cli_env, SAMPLE_LEDGER: str(tmp_path / "ledger")}  # every rank's samples, per step
    nodes = [Launch(command, env), Launch(command, env)]
    try:
        # a checkpoint written by the two nodes together (if one came late, torchrun restarted to take it in)
        wait_until(lambda: any(_world_of(p) == 2 for p in (run_dir / "checkpoints").glob("step_*")),
                   "a checkpoint of world size 2", alive=nodes, interval=0.1)
        host = _listener_of(port)  # the node hosting the rendezvous store must stay (c10d backend)
        victim = next(node for node in nodes if host not in _tree(node.proc.pid))
        survivor = next(node for node in nodes if node is not victim)
        for pid in _tree(victim.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.finish()
        code = survivor.finish()
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                for pid in _tree(node.proc.pid):
                    os.kill(pid, signal.SIGKILL)
    assert code == 0, survivor.output[-8000:]
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == STEPS
    shrink = [i for i in read_metrics(run_dir / "metrics.jsonl").incidents if i["event"] == "resize"][-1]
    assert (shrink["old_size"], shrink["new_size"]) == (2, 1), shrink
    steps, _ = read_metrics(run_dir / "metrics.jsonl").series("loss")
    assert steps == list(range(1, STEPS + 1))
    final = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "bigmodel_meta.json").read_text())
    assert final["world_size"] == 1 and final["train_state"]["samples_seen"] == STEPS * BATCH  # the global batch kept
    counted = samples_by_step(tmp_path / "ledger")  # per-sample ids: each once, in order, at both sizes
    assert [counted[step] for step in sorted(counted)] == [list(range(s * BATCH, (s + 1) * BATCH)) for s in range(STEPS)]


@pytest.mark.parametrize("nnodes, needle", [("2:1", "--nnodes 2:1"), ("0:2", "--nnodes 0:2"),
                                            ("3:3", "train.global_batch_size")])
def test_bad_node_ranges_are_one_line_errors(tmp_path, cli_env, nnodes, needle):
    """3 nodes of 1 process: 8 sequences / (micro 2 x 3) is not whole."""
    result = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=1", f"--nnodes={nnodes}", *TINY,
                      f"--output_dir={tmp_path}"], env=cli_env)
    assert_one_line_error(result, needle)
