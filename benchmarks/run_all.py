"""Run every benchmark of the project and print one table of ratios against their goals.

    python -m benchmarks.run_all          (or: make bench)
Each benchmark runs in its own process and leaves its rows in benchmarks/results/<name>.json; this
script gathers them into benchmarks/results/all.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ("trainer_overhead", "data_pipeline", "checkpoint")


def _rows(name: str) -> list[dict]:
    rows = json.loads((RESULTS / f"{name}.json").read_text())
    if name == "trainer_overhead":  # rows per precision
        return [{"figure": f"trainer ÷ bare DeepSpeed ({r['precision']})", "ratio": r["ratio"], "goal": "<= 1.03",
                 "detail": f"{r['trainer_step_s']:.3f}s vs {r['bare_deepspeed_step_s']:.3f}s per step"} for r in rows]
    return rows


def main() -> int:
    table = []
    for name in BENCHMARKS:
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode
        if code != 0:
            print(f"benchmark {name} failed with exit code {code}", file=sys.stderr)
            return code
        table += [{"benchmark": name, **row} for row in _rows(name)]
    print(f"\n{'benchmark':<18}{'figure':<38}{'ratio':>9}  {'goal':<9}detail")
    for row in table:
        print(f"{row['benchmark']:<18}{row['figure']:<38}{row['ratio']:>9.3f}  {row['goal']:<9}{row['detail']}")
    (RESULTS / "all.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
