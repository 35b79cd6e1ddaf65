"""GPU benchmark: tokens/s, MFU and peak memory of GPT ~350M and ~1.3B, bf16, ZeRO-2 and ZeRO-3, 1 GPU.

    python -m benchmarks.gpu_throughput            (one go, a few minutes on an H100/H200)
    python -m benchmarks.gpu_throughput --smoke    (tiny model, 4 steps, CPU: checks the script itself)

Each case is one `bigmodel train` process (a process group of one) on the offline python-stdlib corpus,
a fixed number of steps; figures are medians over the steps after the warm-up, read from the run's
metrics.jsonl. Peak memory is also divided by `bigmodel plan`'s figure for the same run.
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

from benchmarks.report import RESULTS

CASES = [  # (preset, ZeRO stage, micro-batch): micro-batches that fit 80 GiB with room
    ("gpt2-350m", 2, 16), ("gpt2-350m", 3, 16), ("gpt2-1.3b", 2, 8), ("gpt2-1.3b", 3, 8),
]
SMOKE_CASES = [("gpt2-tiny", 2, 2), ("gpt2-tiny", 3, 2)]


def run_case(preset: str, stage: int, micro: int, steps: int, warmup: int, seq_len: int, work: Path,
             precision: str) -> dict:
    name = f"{preset}-zero{stage}"
    overrides = [f"--name={name}", f"--output_dir={work}", f"--data.cache_dir={work / 'cache'}",
                 f"--model.preset={preset}", f"--deepspeed.config=zero{stage}", f"--train.precision={precision}",
                 f"--data.seq_len={seq_len}", f"--train.micro_batch_size={micro}",
                 f"--train.global_batch_size={micro}", f"--train.max_steps={steps}", "--train.log_every=1",
                 "--train.eval_every=0", "--checkpoint.every=0", "--logging.wandb_mode=disabled",
                 "--data.max_bytes=20000000"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launcher.cli", "train", "configs/gpt2-tiny.yaml", *overrides],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup]
    planned = _planned_gib(overrides)
    peak = max(r["memory/peak_gb_max"] for r in timed) * 1e9 / 2**30
    return {
        "case": name, "micro_batch": micro, "seq_len": seq_len,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else None,
        "peak_gib": peak, "planned_gib": planned, "peak_vs_plan": peak / planned,
        "wall_s": time.perf_counter() - started,
    }


def _planned_gib(overrides: list[str]) -> float:
    """`bigmodel plan`'s total for this case's own ZeRO variant, without the CUDA context (the
    allocator's peak does not include it)."""
    import torch

    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.planner import CUDA_CONTEXT_BYTES, GIB, Hardware, plan_run, variant_of
    from bigmodel_dist.run.resolve import resolve_run

    resolved = resolve_run(load_config("configs/gpt2-tiny.yaml", overrides), 1)
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GIB
    plans = plan_run(resolved, Hardware(gpus=1, gpu_memory=memory))
    mine = next(p for p in plans if p.variant == variant_of(resolved.deepspeed_config).name)
    return (mine.gpu["total"] - CUDA_CONTEXT_BYTES) / GIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, no figures")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args(argv)
    os.chdir(Path(__file__).resolve().parents[1])
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no GPU here: run this on a GPU machine, or --smoke to check the script on CPU", file=sys.stderr)
        return 2
    cases = SMOKE_CASES if args.smoke else CASES
    steps, warmup, seq_len = (4, 1, 128) if args.smoke else (args.steps, args.warmup, args.seq_len)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bigmodel-gpu-bench-") as tmp:
        for preset, stage, micro in cases:
            rows.append(run_case(preset, stage, micro, steps, warmup, seq_len, Path(tmp),
                                 "bf16"))
    print(f"\nGPU benchmark on {device}: bf16, 1 device, {steps} steps (median after {warmup}), seq {seq_len}")
    print(f"{'case':<18}{'micro':>6}{'tokens/s':>12}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}{'peak/plan':>10}")
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['case']:<18}{r['micro_batch']:>6}{r['tokens_per_s']:>12,.0f}{mfu:>7}{r['peak_gib']:>10.2f}"
              f"{r['planned_gib']:>10.2f}{r['peak_vs_plan']:>10.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("gpu_throughput_smoke.json" if args.smoke else "gpu_throughput.json")).write_text(
        json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
