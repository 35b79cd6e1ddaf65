"""Run every benchmark of the project and print one table of ratios against their goals.

    python -m benchmarks.run_all [--quick]          (or: make bench)
Each benchmark runs in its own process and leaves its rows in benchmarks/results/<name>.json; this
script gathers them into benchmarks/results/all.json. --quick runs each on a tiny model and small
inputs (a few minutes; what CI runs): it checks the benchmarks work, its ratios are not the figures.
The GPU benchmark (`benchmarks/gpu_throughput.py`) is separate: it needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"
BENCHMARKS = ("trainer_overhead", "data_pipeline", "checkpoint", "planner_accuracy", "startup", "precision",
              "resilience", "elastic")
QUICK_ARGS = {
    "startup": ["--repeats", "1", "--no-cold"],
    "precision": ["--steps", "2", "--rounds", "1"],
    "trainer_overhead": ["--preset", "gpt2-tiny", "--blocks", "2", "--block-steps", "3"],
    "data_pipeline": ["--mbytes", "1", "--vocab", "1024", "--seq-len", "128", "--repeats", "1"],
    "checkpoint": ["--preset", "gpt2-tiny", "--repeats", "1"],
    "planner_accuracy": ["--quick"],
    "resilience": ["--blocks", "2", "--block-steps", "3", "--hang-timeout", "5", "--health-repeats", "1"],
    "elastic": ["--preset", "gpt2-tiny", "--repeats", "1"],
}


def _rows(name: str, results: Path) -> list[dict]:
    rows = json.loads((results / f"{name}.json").read_text())
    if name == "trainer_overhead":  # rows per precision
        return [{"figure": f"trainer ÷ bare DeepSpeed ({r['precision']})", "ratio": r["ratio"], "goal": "<= 1.03",
                 "detail": f"{r['trainer_step_s']:.3f}s vs {r['bare_deepspeed_step_s']:.3f}s per step"} for r in rows]
    return rows


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    results = QUICK_RESULTS if quick else RESULTS
    env = {**os.environ, "BIGMODEL_BENCH_RESULTS": str(results)}
    table = []
    for name in BENCHMARKS:
        extra = QUICK_ARGS[name] if quick else []
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], env=env).returncode
        if code != 0:
            print(f"benchmark {name} failed with exit code {code}", file=sys.stderr)
            return code
        table += [{"benchmark": name, **row} for row in _rows(name, results)]
    print(f"\n{'benchmark':<18}{'figure':<38}{'ratio':>9}  {'goal':<11}detail" + ("   (QUICK MODE)" if quick else ""))
    for row in table:
        print(f"{row['benchmark']:<18}{row['figure']:<38}{row['ratio']:>9.3f}  {row['goal']:<11}{row['detail']}")
    (results / "all.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
