"""Resume equals straight: a run stopped by a signal and restarted gives the same per-step losses.

Real DeepSpeed engines under `bigmodel launch local` (torchrun, 2 processes, gloo). The signal goes to
the launcher, which forwards it through torchrun to every worker; they agree on a stop step, save one
checkpoint, exit with the requeue code; a new process group resumes and finishes. Bit-exact on CPU.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.distributed
STEPS = 10


def _launch(tmp_path: Path, data_cache: Path, env, name: str, stage: int, extra: list[str] = ()) -> subprocess.Popen:
    from .conftest import TINY

    command = [sys.executable, "-m", "launcher.cli", "launch", "local", str(REPO / "configs" / "gpt2-tiny.yaml"),
               "--nproc-per-node=2", *TINY, f"--output_dir={tmp_path}", f"--data.cache_dir={data_cache}",
               f"--name={name}", f"--deepspeed.config=zero{stage}", f"--train.max_steps={STEPS}",
               "--train.eval_every=0", "--checkpoint.every=0", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _signal_when_step_logged(proc: subprocess.Popen, metrics: Path, step: int, signum: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()):
            proc.send_signal(signum)
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged; output:\n{proc.communicate()[0][-3000:]}")


# SIGUSR1 through `launch local` is also what the Slurm preemption test sends (tests/test_slurm.py).
@pytest.mark.parametrize(("stage", "signum"), [(1, signal.SIGUSR1), (3, signal.SIGTERM)])
def test_stop_and_resume_equals_straight_run(tmp_path, data_cache, cli_env, stage, signum):
    straight = _launch(tmp_path, data_cache, cli_env, "straight", stage)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]
    expected = _losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "stopped"
    first = _launch(tmp_path, data_cache, cli_env, "stopped", stage)
    _signal_when_step_logged(first, run_dir / "metrics.jsonl", 3, signum)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 85, out[-3000:]  # checkpoint.requeue_exit_code
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1, checkpoints  # exactly one: the stop checkpoint (checkpoint.every=0)
    stop_step = int(checkpoints[0].split("_")[1])
    assert 3 <= stop_step < STEPS
    meta = json.loads((run_dir / "checkpoints" / checkpoints[0] / "bigmodel_meta.json").read_text())
    assert meta["stop_reason"] == "signal" and meta["samples_seen"] == stop_step * 8
    assert {f"random_states_{r}.pkl" for r in range(2)} <= set(meta["files"])  # both ranks saved at that step
    assert json.loads((run_dir / "STOPPED").read_text())["step"] == stop_step

    second = _launch(tmp_path, data_cache, cli_env, "stopped", stage)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / checkpoints[0]} at step {stop_step}" in out
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # every step logged once: no repeats, no gaps
    assert [resumed[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
