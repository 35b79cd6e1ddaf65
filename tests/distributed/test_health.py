"""`bigmodel check`: the node health check on 2 real gloo ranks under torchrun (healthy; one rank made
slow by injection), its refusals, and the judging and bus-bandwidth arithmetic on their own."""

from __future__ import annotations

import json
import socket

import pytest

from bigmodel_dist.core.env import ALLOW_FAULTS, FAULTS, SUSPECT_NODES_FILE
from bigmodel_dist.ft.health import RankHealth, allreduce_bandwidth, host_memory, judge
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.helpers.commands import TINY_CONFIG, assert_one_line_error, run_cli

GIB = 2**30


def test_bus_bandwidth_is_nccl_tests_definition():
    # nccl-tests (doc/PERFORMANCE.md): all-reduce busbw = algbw * 2(n-1)/n
    assert allreduce_bandwidth(10**9, 1.0, 8) == (1.0, 1.75)
    assert allreduce_bandwidth(2 * 10**9, 0.5, 2) == (4.0, 4.0)  # two ranks: every byte crosses once each way
    assert allreduce_bandwidth(10**9, 2.0, 1)[1] == 0.0


def test_host_memory_reads_total_and_available():
    assert host_memory("MemTotal:  2048 kB\nMemFree: 10 kB\nMemAvailable:    1024 kB\n") == (2048 * 1024, 1024 * 1024)


def _rank(rank: int, host: str, tflops: float | None, free: int = 70 * GIB, error: str | None = None) -> RankHealth:
    return RankHealth(rank=rank, host=host, device="GPU", matmul_tflops=tflops, memory_total_bytes=80 * GIB,
                      memory_free_bytes=free, error=error)


def test_nodes_are_judged_by_their_slowest_rank_against_the_median_node():
    ranks = [_rank(0, "n1", 700), _rank(1, "n1", 690), _rank(2, "n2", 710), _rank(3, "n2", 360),
             _rank(4, "n3", 705), _rank(5, "n3", 702)]
    units = judge(ranks, slow_factor=2.0, on_gpu=True)
    assert [(u.name, u.ranks, u.matmul_tflops) for u in units] == [("n1", (0, 1), 690), ("n2", (2, 3), 360),
                                                                    ("n3", (4, 5), 702)]
    assert [u.ok for u in units] == [True, True, True]  # 360 is not below the others' median 696 / 2
    units = judge(ranks, slow_factor=1.5, on_gpu=True)
    assert [u.name for u in units if not u.ok] == ["n2"]
    assert "matmul 360 TFLOP/s is below the others' median 696 / 1.5" in units[1].problem


def test_a_failed_rank_or_a_full_gpu_names_its_node():
    ranks = [_rank(0, "n1", 700), _rank(1, "n2", None, error="RuntimeError: CUDA error: ECC"),
             _rank(2, "n3", 700, free=2 * GIB), _rank(3, "n4", 700)]
    units = judge(ranks, slow_factor=2.0, on_gpu=True)
    assert [u.name for u in units if not u.ok] == ["n2", "n3"]
    assert "failed on rank 1: RuntimeError: CUDA error: ECC" in units[1].problem
    assert "GPU memory free" in units[2].problem
    # host RAM on CPU is shared by every process of a node: never judged
    assert all(u.ok for u in judge([_rank(0, "a", 1.0), _rank(1, "b", 1.0, free=GIB // 8)], 2.0, on_gpu=False))


def test_one_node_compares_its_ranks():
    units = judge([_rank(0, "box", 0.08), _rank(1, "box", 0.02)], slow_factor=2.0, on_gpu=False)
    assert [u.name for u in units] == ["rank 0 on host box", "rank 1 on host box"]
    assert [u.ok for u in units] == [True, False] and units[1].host == "box"


# ---- real processes ---------------------------------------------------------------------------------
@pytest.fixture
def check_env(cli_env, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in cli_env.items() if k not in (FAULTS, ALLOW_FAULTS)}
    return {**env, SUSPECT_NODES_FILE: str(tmp_path / "suspects.txt")}


def _check(tmp_path, env, *overrides: str):
    return run_cli(["check", TINY_CONFIG, "--nproc-per-node=2", f"--output_dir={tmp_path}", "--name=hc",
                    *overrides], env=env)


def _report(tmp_path) -> dict:
    [path] = (tmp_path / "hc" / "logs").glob("health-*.json")
    return json.loads(path.read_text())


@pytest.mark.distributed
def test_healthy_ranks_pass(tmp_path, check_env):
    result = _check(tmp_path, check_env)
    assert result.returncode == 0, result.stderr[-3000:]
    host = socket.gethostname()
    lines = result.stdout.splitlines()
    for rank in (0, 1):
        assert any(line.startswith(f"rank {rank} on host {host}: ") and line.endswith(": ok") for line in lines), lines
    assert any(line.startswith("all-reduce of 4 MiB across 2 ranks:") and "busbw" in line for line in lines), lines
    report = _report(tmp_path)
    assert report["healthy"] and report["world_size"] == 2 and report["allreduce"]["busbw_gbps"] > 0
    assert all(r["matmul_tflops"] > 0 and r["memory_free_bytes"] > 0 for r in report["ranks"])
    # sized for well under a second of work per rank: 30 s inside the process group means mis-sized tests
    assert report["seconds"] < 30, report["seconds"]
    assert not (tmp_path / "suspects.txt").exists()


@pytest.mark.distributed
def test_a_slow_rank_is_named_and_its_host_recorded(tmp_path, check_env):
    env = {**check_env, FAULTS: "slow_node:rank=1,factor=4", ALLOW_FAULTS: "1"}
    result = _check(tmp_path, env)
    assert result.returncode == 87, result.stderr[-3000:]  # resilience.bad_node_exit_code
    host = socket.gethostname()
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"rank 1 on host {host}: ") and "BAD: matmul" in line for line in lines), lines
    assert any(line.startswith(f"rank 0 on host {host}: ") and line.endswith(": ok") for line in lines), lines
    assert f"health check: BAD rank 1 on host {host}" in result.stdout
    assert (tmp_path / "suspects.txt").read_text() == f"{host}\n"
    assert _report(tmp_path)["bad_hosts"] == [host]
    (incident,) = read_metrics(tmp_path / "hc" / "metrics.jsonl").incidents  # one line for the run's history
    assert incident["event"] == "bad_node" and incident["unit"] == f"rank 1 on host {host}"
    assert incident["host"] == host and "matmul" in incident["problem"]


@pytest.mark.parametrize(("faults", "allow", "needle"), [
    ("slow_node:rank=1", None, "BIGMODEL_ALLOW_FAULTS=1"),
    ("fast_node:rank=1", "1", "unknown fault 'fast_node'"),
])
def test_refused_faults(tmp_path, check_env, faults, allow, needle):
    env = {**check_env, FAULTS: faults, **({ALLOW_FAULTS: allow} if allow else {})}
    assert_one_line_error(_check(tmp_path, env), needle)


@pytest.mark.parametrize(("override", "needle"), [
    ("--resilience.health_slow_factor=1.0", "resilience.health_slow_factor"),
    ("--resilience.bad_node_exit_code=85", "exit codes must differ"),
    ("--resilience.bad_node_exit_code=300", "resilience.bad_node_exit_code"),
])
def test_refused_resilience_values(tmp_path, check_env, override, needle):
    assert_one_line_error(_check(tmp_path, check_env, override), needle)
