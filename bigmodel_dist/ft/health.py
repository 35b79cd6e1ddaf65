"""Node health check before training: matmul throughput, device memory and all-reduce bus bandwidth on
every rank; a node far below the others, or failing, is named bad.

Collective: `run_health_check` runs inside a started process group (gloo on CPU, NCCL on GPU) and every
rank gets the same `HealthReport`. `bigmodel check` (launcher/check.py) runs it under torchrun; the
Slurm script runs that on every node before training and requeues a job with a bad node without it.

What is compared: **nodes**, ranks grouped by hostname, each as fast as its slowest rank (one slow GPU
drags every step of the run). A node is bad when its matmul throughput is below the median of the
other nodes divided by `resilience.health_slow_factor`, when a GPU of it has less free memory than the
others' median by the same factor (a stray process holding it), or when a rank of it failed its
measurements. With a single node there is no other node to compare with, so its **ranks** are compared
instead, each named "rank R on host H" (a slow rank there still names its host as the suspect). On
CPU the ranks of a node take turns at the matmul, so that they do not measure each other's load. Throughput against the
device's expected peak (`bigmodel_dist/metrics/logger.py`'s table) is reported, not judged: the reachable
fraction differs between models of one name (H100 SXM vs PCIe).

All-reduce bandwidth is one figure for the whole job (every rank takes part in every all-reduce), as
nccl-tests defines it: algbw = bytes / time, busbw = algbw * 2(n-1)/n, the rate each rank's link
carries in a ring all-reduce, comparable across world sizes.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigmodel_dist.config.schema import LoggingConfig, ResilienceConfig
from bigmodel_dist.core.distributed import DistributedFacts
from bigmodel_dist.core.fileio import write_json_atomically
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.faults import Faults
from bigmodel_dist.metrics.logger import device_peak_tflops
from bigmodel_dist.run.precision import cpu_name_and_flags

log = logging.getLogger(__name__)
GB = 1e9  # nccl-tests reports GB/s of 10^9 bytes
GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    """How much work each test does: well under a second per rank on a 2-core CPU or one GPU."""

    matmul_n: int  # square matmuls of n x n
    matmuls_per_rep: int
    matmul_reps: int  # timed repetitions; the fastest counts (a busy neighbour slows some, not all)
    allreduce_bytes: int
    allreduce_iters: int


CPU_SIZES = Sizes(matmul_n=1024, matmuls_per_rep=1, matmul_reps=5, allreduce_bytes=4 * 2**20, allreduce_iters=5)
GPU_SIZES = Sizes(matmul_n=8192, matmuls_per_rep=10, matmul_reps=5, allreduce_bytes=256 * 2**20, allreduce_iters=10)


@dataclass(frozen=True)
class RankHealth:
    """One rank's own measurements (or the error that stopped them)."""

    rank: int
    host: str
    device: str
    matmul_tflops: float | None = None
    peak_tflops: float | None = None  # the device's expected dense bf16 peak, where known
    memory_total_bytes: int | None = None  # GPU memory, or the host's RAM on CPU
    memory_free_bytes: int | None = None  # free GPU memory, or available host RAM on CPU
    allreduce_s: float | None = None  # mean seconds per all-reduce of the job-wide test
    error: str | None = None


@dataclass(frozen=True)
class UnitHealth:
    """One node (or one rank, on a single node) as judged against the others."""

    name: str  # the hostname, or "rank R on host H" on a single node
    host: str
    ranks: tuple[int, ...]
    device: str
    matmul_tflops: float | None  # its slowest rank's
    peak_tflops: float | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None  # its emptiest device's
    on_gpu: bool
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class HealthReport:
    units: list[UnitHealth]
    ranks: list[RankHealth]
    allreduce_bytes: int
    slow_factor: float
    seconds: float  # wall time of the measurements and the gather, on this rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def bad(self) -> list[UnitHealth]:
        return [unit for unit in self.units if not unit.ok]

    @property
    def bad_hosts(self) -> list[str]:
        return sorted({unit.host for unit in self.bad})

    @property
    def allreduce_s(self) -> float | None:
        """The slowest rank's mean time per all-reduce (None with one rank: nothing to reduce across)."""
        times = [r.allreduce_s for r in self.ranks if r.allreduce_s is not None]
        return max(times) if times else None

    def lines(self) -> list[str]:
        """The report: one line per node (or rank), then the all-reduce and the verdict."""
        lines = [_unit_line(unit) for unit in self.units]
        if self.allreduce_s is not None:
            algbw, busbw = allreduce_bandwidth(self.allreduce_bytes, self.allreduce_s, self.world_size)
            lines.append(f"all-reduce of {self.allreduce_bytes / 2**20:g} MiB across {self.world_size} ranks: "
                         f"{self.allreduce_s * 1e3:.2f} ms, algbw {algbw:.2f} GB/s, busbw {busbw:.2f} GB/s")
        kind = "rank(s) of one node" if len({u.host for u in self.units}) == 1 and len(self.units) > 1 else "node(s)"
        if self.bad:
            lines.append(f"health check: BAD {', '.join(u.name for u in self.bad)} "
                         f"({len(self.bad)} of {len(self.units)} {kind}; factor {self.slow_factor:g})")
        else:
            lines.append(f"health check: {len(self.units)} {kind} healthy in {self.seconds:.1f}s")
        return lines

    def as_dict(self) -> dict[str, Any]:
        algbw = busbw = None
        if self.allreduce_s is not None:
            algbw, busbw = allreduce_bandwidth(self.allreduce_bytes, self.allreduce_s, self.world_size)
        return {"healthy": not self.bad, "bad": [u.name for u in self.bad], "bad_hosts": self.bad_hosts,
                "slow_factor": self.slow_factor, "world_size": self.world_size, "seconds": self.seconds,
                "allreduce": {"bytes": self.allreduce_bytes, "seconds": self.allreduce_s, "algbw_gbps": algbw,
                              "busbw_gbps": busbw},
                "units": [asdict(u) for u in self.units], "ranks": [asdict(r) for r in self.ranks],
                "lines": self.lines()}


def allreduce_bandwidth(num_bytes: int, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s of one all-reduce of `num_bytes` per rank, as nccl-tests defines them."""
    algbw = num_bytes / seconds / GB
    return algbw, algbw * 2 * (world_size - 1) / world_size


# ---- per rank ---------------------------------------------------------------------------------------
def measure_matmul(device: torch.device, sizes: Sizes, slowdown: float = 1.0) -> float:
    """TFLOP/s of the fastest of `matmul_reps` timed repetitions (bf16 on GPU, fp32 on CPU).
    `slowdown` > 1 (an injected slow node) sleeps inside each repetition to stretch it that many times."""
    n = sizes.matmul_n
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel choice, first-touch of memory
    best = float("inf")
    for _ in range(sizes.matmul_reps):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(sizes.matmuls_per_rep):
            torch.matmul(a, b)
        _synchronize(device)
        if slowdown > 1.0:
            time.sleep((time.perf_counter() - start) * (slowdown - 1.0))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * sizes.matmuls_per_rep / best / 1e12


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes: of the GPU, or the host's RAM and what is available of it on CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    return host_memory()


def host_memory(meminfo: str | None = None) -> tuple[int, int]:
    """(MemTotal, MemAvailable) bytes from /proc/meminfo."""
    if meminfo is None:
        meminfo = Path("/proc/meminfo").read_text()
    fields = {}
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) * 1024  # kB
    return fields["MemTotal"], fields["MemAvailable"]


def probe_rank(rank: int, device: torch.device, logging_cfg: LoggingConfig, faults: Faults,
               sizes: Sizes) -> RankHealth:
    """This rank's memory and matmul figures; an exception becomes the finding (it names this node)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name_and_flags()[0]})"
    found = RankHealth(rank=rank, host=socket.gethostname(), device=name,
                       peak_tflops=device_peak_tflops(logging_cfg, name))
    try:
        total, free = device_memory(device)  # before our own tensors take some
        tflops = measure_matmul(device, sizes, slowdown=faults.matmul_slowdown(rank))
    except Exception as exc:  # a broken device is what this check looks for: report it, do not crash
        log.warning("health check on rank %d (%s): %s", rank, found.host, exc)
        return replace(found, error=f"{type(exc).__name__}: {exc}")
    return replace(found, matmul_tflops=tflops, memory_total_bytes=total, memory_free_bytes=free)


def measure_allreduce(device: torch.device, sizes: Sizes, world_size: int) -> float | None:
    """Mean seconds per all-reduce of `allreduce_bytes` (fp32). Collective: every rank calls it."""
    if world_size < 2:
        return None
    buffer = torch.zeros(sizes.allreduce_bytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buffer)  # warm-up: connections, buffers; also lines the ranks up
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(sizes.allreduce_iters):
        dist.all_reduce(buffer)
    _synchronize(device)
    return (time.perf_counter() - start) / sizes.allreduce_iters


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- all ranks --------------------------------------------------------------------------------------
def run_health_check(facts: DistributedFacts, resilience: ResilienceConfig, logging_cfg: LoggingConfig,
                     faults: Faults, sizes: Sizes | None = None) -> HealthReport:
    """Measure every rank, gather, judge. Collective: every rank calls it and gets the same report.
    On GPU the current CUDA device must be this rank's (torch.cuda.set_device(local_rank))."""
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    sizes = sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    # GPUs are measured together, as they will run; a node's CPU ranks take turns, as they share the cores
    for turn in range(1 if on_gpu else facts.local_world_size):
        dist.barrier()
        if on_gpu or turn == facts.local_rank:
            mine = probe_rank(facts.rank, device, logging_cfg, faults, sizes)
    mine = replace(mine, allreduce_s=measure_allreduce(device, sizes, facts.world_size))
    gathered: list[Any] = [None] * facts.world_size
    dist.all_gather_object(gathered, mine)
    ranks: list[RankHealth] = sorted(gathered, key=lambda r: r.rank)
    return HealthReport(units=judge(ranks, resilience.health_slow_factor, on_gpu), ranks=ranks,
                        allreduce_bytes=sizes.allreduce_bytes, slow_factor=resilience.health_slow_factor,
                        seconds=time.perf_counter() - started)


def judge(ranks: list[RankHealth], slow_factor: float, on_gpu: bool) -> list[UnitHealth]:
    """Group ranks into nodes (or, on a single node, keep them apart) and name the bad ones."""
    per_rank = len({r.host for r in ranks}) == 1 and len(ranks) > 1
    groups: dict[str, list[RankHealth]] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        groups.setdefault(f"rank {r.rank} on host {r.host}" if per_rank else r.host, []).append(r)
    units = [_unit(name, members, on_gpu) for name, members in groups.items()]
    judged = []
    for unit, members in zip(units, groups.values()):
        others = [u for u in units if u is not unit]
        tflops = _median([u.matmul_tflops for u in others])
        free = _median([u.memory_free_bytes for u in others])
        failed = [r for r in members if r.error]
        problem = None
        if failed:
            problem = f"failed on rank {failed[0].rank}: {failed[0].error}"
        elif tflops and unit.matmul_tflops is not None and unit.matmul_tflops < tflops / slow_factor:
            problem = f"matmul {unit.matmul_tflops:.3g} TFLOP/s is below the others' median {tflops:.3g} / {slow_factor:g}"
        elif on_gpu and free and unit.memory_free_bytes is not None and unit.memory_free_bytes < free / slow_factor:
            problem = (f"{unit.memory_free_bytes / GIB:.1f} GiB GPU memory free, below the others' median "
                       f"{free / GIB:.1f} GiB / {slow_factor:g} (another process holds it?)")
        judged.append(replace(unit, problem=problem))
    return judged


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _unit(name: str, members: list[RankHealth], on_gpu: bool) -> UnitHealth:
    measured = [r for r in members if r.matmul_tflops is not None]
    slowest = min(measured, key=lambda r: r.matmul_tflops or 0.0, default=None)
    free = [r.memory_free_bytes for r in members if r.memory_free_bytes is not None]
    total = [r.memory_total_bytes for r in members if r.memory_total_bytes is not None]
    return UnitHealth(name=name, host=members[0].host, ranks=tuple(r.rank for r in members),
                      device=members[0].device, matmul_tflops=slowest.matmul_tflops if slowest else None,
                      peak_tflops=members[0].peak_tflops, memory_total_bytes=min(total, default=None),
                      memory_free_bytes=min(free, default=None), on_gpu=on_gpu)


def _unit_line(unit: UnitHealth) -> str:
    where = unit.name if unit.name.startswith("rank ") else f"{unit.name} ({_ranks_text(unit.ranks)})"
    parts = [where, unit.device]
    if unit.matmul_tflops is not None:
        peak = f" ({unit.matmul_tflops / unit.peak_tflops:.0%} of peak {unit.peak_tflops:g})" if unit.peak_tflops else ""
        parts.append(f"matmul {unit.matmul_tflops:.3g} TFLOP/s{peak}")
    if unit.memory_free_bytes is not None and unit.memory_total_bytes is not None:
        what = "GPU memory free" if unit.on_gpu else "host memory available"
        parts.append(f"{what} {unit.memory_free_bytes / GIB:.1f} of {unit.memory_total_bytes / GIB:.1f} GiB")
    return f"{parts[0]}: " + ", ".join(parts[1:]) + (f": BAD: {unit.problem}" if unit.problem else ": ok")


def _ranks_text(ranks: tuple[int, ...]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def write_report(report: HealthReport, run_dir: RunDir) -> Path:
    """RUN_DIR/logs/health-<UTC time>.json: everything measured, and the verdict."""
    path = run_dir.logs / f"health-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, report.as_dict())
    return path


def record_bad_nodes(report: HealthReport, run_dir: RunDir, report_path: str) -> None:
    """One `bad_node` incident per bad node in the run's metrics.jsonl, at the step the run is at."""
    from bigmodel_dist.metrics.jsonl import append_incident, read_metrics

    if not report.bad:
        return
    metrics = run_dir.metrics
    step = read_metrics(metrics).last_step()
    metrics.parent.mkdir(parents=True, exist_ok=True)
    for unit in report.bad:
        append_incident(metrics, "bad_node", step, host=unit.host, unit=unit.name, problem=unit.problem,
                        report=report_path, check_s=report.seconds)


def check_before_training(facts: DistributedFacts, resilience: ResilienceConfig, logging_cfg: LoggingConfig,
                          run_dir: RunDir, faults: Faults) -> None:
    """Collective, in a process group that is already up (a Ray worker group): the health check, its
    report on rank 0, and a RunFailedError on every rank naming the bad nodes, if any."""
    from bigmodel_dist.core.errors import RunFailedError
    from bigmodel_dist.ft.suspects import record_suspect_nodes

    report = run_health_check(facts, resilience, logging_cfg, faults)
    if facts.is_main:
        for line in report.lines():
            log.info("%s", line)
        path = write_report(report, run_dir)
        record_bad_nodes(report, run_dir, str(path))
        record_suspect_nodes(report.bad_hosts)
    if report.bad:
        raise RunFailedError(f"node health check: bad {', '.join(u.name for u in report.bad)}; see "
                             f"{run_dir.logs}/health-*.json", on_every_rank=True)
