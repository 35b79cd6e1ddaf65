"""Wall time of `bigmodel check` on this machine: command start to exit, torchrun and imports included.

The node health check runs at the start of every Slurm attempt, so its whole wall time is what a job
pays (goal: <= 15 s for 2 ranks here). `health_check_seconds` is what benchmarks/resilience.py calls.

    python -m benchmarks.health [--nproc-per-node 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 15.0


def health_check_seconds(nproc_per_node: int = 2, repeats: int = 3, config: str = "configs/gpt2-tiny.yaml") -> list[float]:
    """Wall seconds of each of `repeats` healthy `bigmodel check` runs; an unhealthy or failed one raises."""
    env = {k: v for k, v in os.environ.items() if k not in ("BIGMODEL_FAULTS", "BIGMODEL_SUSPECT_NODES_FILE")}
    seconds = []
    with tempfile.TemporaryDirectory(prefix="bench-health-") as out:
        for _ in range(repeats):
            command = [sys.executable, "-m", "launcher.cli", "check", config, f"--nproc-per-node={nproc_per_node}",
                       f"--output_dir={out}"]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            seconds.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise RuntimeError(f"bigmodel check exited {result.returncode}:\n{result.stdout}{result.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    seconds = health_check_seconds(args.nproc_per_node, args.repeats)
    median = statistics.median(seconds)
    report("health", f"bigmodel check, {args.nproc_per_node} ranks, {args.repeats} runs",
           [{"figure": f"health check wall ÷ {GOAL_S:g} s", "ratio": median / GOAL_S, "goal": "<= 1",
             "detail": f"median {median:.1f}s ({', '.join(f'{s:.1f}' for s in seconds)})"}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
