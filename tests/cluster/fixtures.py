"""Fixtures of the real local clusters: `slurm_cluster` (two-node Slurm of start_slurm.sh, session-wide)
and `ray_cluster` (a Ray head, for the tests/cluster package)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.guards import HANG_GUARD_S

HERE = Path(__file__).resolve().parent
DAEMONS = {"munged": "munged", "slurmctld": "slurmctld", "slurmd-n1": "slurmd", "slurmd-n2": "slurmd"}


@dataclass(frozen=True)
class SlurmCluster:
    conf: str  # slurm.conf; also os.environ["SLURM_CONF"] while the session runs
    base: Path  # the cluster's config (etc/), logs (log/), pid files (run/) and state


def running_daemons(base: Path) -> list[str]:
    """The cluster's daemons whose pid file names a live process of the right program."""
    alive = []
    for name, program in DAEMONS.items():
        pid_file = base / "run" / f"{name}.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        comm = Path(f"/proc/{pid}/comm")
        if pid.isdigit() and comm.exists() and comm.read_text().strip() == program:
            alive.append(name)
    return alive


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the cluster (or reuse a running one); stop it at the end only if this session started it."""
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster needs root (daemons, namespaces, apt): run the tests as root, as CI does")
    base = Path(os.environ.get("BIGMODEL_SLURM_BASE", "/tmp/bigmodel-slurm"))
    started_here = not running_daemons(base)
    try:
        conf = _start(base)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SLURM_CONF", conf)
            yield SlurmCluster(conf=conf, base=base)
    finally:
        if started_here:
            subprocess.run([HERE / "stop_slurm.sh"], capture_output=True, timeout=HANG_GUARD_S, check=False)


def _start(base: Path) -> str:
    """Run start_slurm.sh and return the SLURM_CONF it prints."""
    try:
        start = subprocess.run([HERE / "start_slurm.sh"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"start_slurm.sh did not finish within 300 s; logs in {base}/log")
    match = re.fullmatch(r"export SLURM_CONF=(\S+)\n", start.stdout)
    if start.returncode != 0 or not match:
        pytest.fail(f"start_slurm.sh failed (exit {start.returncode}):\n{start.stdout}{start.stderr[-6000:]}")
    return match[1]


@pytest.fixture(scope="package")
def ray_cluster():
    """A real Ray head confined to loopback (its own network namespace), stopped by PID after the last
    test of the package that uses it (tests/cluster: its Ray modules run one after another): its idle
    daemons would otherwise take CPU from the rest of the suite."""
    from tests.cluster import ray_cluster as local_ray

    if os.geteuid() != 0:
        pytest.fail("the local Ray cluster needs root (a network namespace): run the tests as root, as CI does")
    cluster = local_ray.start()
    try:
        yield cluster
    finally:
        local_ray.stop()
