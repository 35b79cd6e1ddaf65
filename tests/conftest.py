"""Shared fixtures: a small local corpus config and a tokenizer/data cache reused across tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (the real local Slurm cluster, session-wide)

REPO = Path(__file__).resolve().parents[1]

# Settings every spawned rank must share: tiny model, small corpus, no W&B network.
TINY = [
    "--model.preset=gpt2-tiny",
    "--data.max_bytes=400000",
    "--data.seq_len=128",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=2",
    "--train.log_every=1",
    "--logging.wandb_mode=disabled",
]


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Callable[[int], Path]]:
    """`small_tmpfs(mib)`: a size-limited tmpfs mounted at a new folder under tmp_path (a real full disk;
    CI runs as root), unmounted after the test."""
    import subprocess

    assert os.geteuid() == 0, "mounting a size-limited tmpfs needs root (CI runs as root)"
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer + packed-data cache for the whole session (training a BPE takes seconds)."""
    return tmp_path_factory.mktemp("data-cache")


def tiny_run(output_dir: Path, data_cache: Path) -> list[str]:
    """The overrides of a tiny run writing under `output_dir` with the session's data cache."""
    return [*TINY, f"--output_dir={output_dir}", f"--data.cache_dir={data_cache}"]


@pytest.fixture
def tiny_overrides(tmp_path, data_cache) -> list[str]:
    return tiny_run(tmp_path, data_cache)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `bigmodel` subprocesses: this interpreter's scripts first, quiet W&B."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_SILENT"] = "true"
    return env


# The one run that every stop-and-resume test compares with (tests/distributed/test_resume.py, the Slurm requeue):
# 30 steps leave time to stop it mid-run on fast machines; its straight reference is run once per stage.
RESUME_STEPS = 30
RESUME_RUN = [*TINY, "--train.eval_every=0", "--checkpoint.every=0", f"--train.max_steps={RESUME_STEPS}"]


@pytest.fixture(scope="session")
def straight_losses(tmp_path_factory, data_cache) -> Callable[[int], dict[int, float]]:
    """`straight_losses(stage)`: per-step losses of RESUME_RUN uninterrupted (launch local, 2 ranks)."""
    from tests.helpers.commands import run_command
    from tests.helpers.launching import launch_local_command, losses

    done: dict[int, dict[int, float]] = {}

    def get(stage: int) -> dict[int, float]:
        if stage not in done:
            out = tmp_path_factory.mktemp(f"straight-zero{stage}")
            command = launch_local_command(*RESUME_RUN, f"--output_dir={out}", f"--data.cache_dir={data_cache}",
                                           "--name=straight", f"--deepspeed.config=zero{stage}")
            result = run_command(command)
            assert result.returncode == 0, result.stderr[-3000:]
            done[stage] = losses(out / "straight")
            assert sorted(done[stage]) == list(range(1, RESUME_STEPS + 1))
        return done[stage]

    return get


class FileTimes:
    """Per-file wall time at the end of every run (setup, call and teardown; a shared fixture counts in
    the file that first needed it): where the suite's minutes go, on whatever machine it ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report) -> None:
        path = report.nodeid.split("::", 1)[0]
        self.seconds[path] = self.seconds.get(path, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        terminalreporter.section("seconds per test file")
        for path, seconds in sorted(self.seconds.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:8.1f}  {path}")
        terminalreporter.write_line(f"{sum(self.seconds.values()):8.1f}  total")


def pytest_configure(config) -> None:
    config.pluginmanager.register(FileTimes(), "file-times")
