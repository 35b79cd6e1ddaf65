"""Start-up: `bigmodel launch local` start -> first optimizer step of the tiny model, cold and warm.

Cold drops the page cache first (`echo 3 > /proc/sys/vm/drop_caches`, root only), so every library is
read from disk again, as on a node that has not run the job lately; warm runs straight after. Each
figure is the median of `--repeats` launches (data prepared beforehand, so data preparation is not
counted). The breakdown comes from the workers' own start-up clock (`startup/*` in metrics.jsonl):
the launcher's share (its imports, config checks, torchrun start) is the time from launch to the
workers' process start.

Goals on a 2-core CPU: warm <= 15 s, cold <= 45 s (ratio = measured / goal, <= 1 meets it).

    python -m benchmarks.startup [--repeats 3] [--no-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
GOALS_S = {"warm": 15.0, "cold": 45.0}
RUN = ["--train.max_steps=1", "--checkpoint.every=0", "--train.eval_every=0", "--train.log_every=1",
       "--logging.wandb_mode=offline", "--nproc-per-node=2"]


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only); False where it cannot."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def launch_once(workdir: Path, cache: Path, name: str) -> dict[str, float]:
    """One whole `bigmodel launch local` run; the start-up phases of its rank 0, in seconds."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "local", str(REPO / "configs" / "gpt2-tiny.yaml"),
                    *RUN, f"--output_dir={workdir}", f"--data.cache_dir={cache}", f"--name={name}"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    record = next(json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()
                  if "startup/total_s" in line)
    worker_started = record["time"] - record["startup/total_s"]
    phases = {"launcher + torchrun": worker_started - started}
    phases.update({key[len("startup/"):-2]: value for key, value in record.items()
                   if key.startswith("startup/") and key != "startup/total_s"})
    phases["total"] = record["time"] - started
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="warm runs only (no page-cache drop)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        workdir, cache = Path(tmp), Path(tmp) / "cache"
        launch_once(workdir, cache, "prime")  # tokenizer and packed data, once
        modes = ["warm"] if args.no_cold else ["cold", "warm"]
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for i in range(args.repeats):
            for mode in modes:
                if mode == "cold" and not drop_page_cache():
                    print("startup: cannot drop the page cache (needs root); measuring warm only", file=sys.stderr)
                    modes.remove("cold")
                    del runs["cold"]
                    continue
                runs[mode].append(launch_once(workdir, cache, f"{mode}{i}"))
    phases = list(runs[modes[0]][0])
    print(f"\n{'phase (median s)':<24}" + "".join(f"{mode:>10}" for mode in modes))
    for phase in phases:
        print(f"{phase:<24}" + "".join(f"{statistics.median(r[phase] for r in runs[m]):>10.1f}" for m in modes))
    rows = []
    for mode in modes:
        total = statistics.median(r["total"] for r in runs[mode])
        worst = max(r["total"] for r in runs[mode])
        rows.append({"figure": f"start-up to first step, {mode}", "ratio": total / GOALS_S[mode], "goal": "<= 1",
                     "detail": f"{total:.1f}s median (max {worst:.1f}s) vs goal {GOALS_S[mode]:.0f}s, "
                               f"{len(runs[mode])} launches"})
    report("startup", "Start-up: launch -> first step ÷ goal", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
