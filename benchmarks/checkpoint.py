"""Checkpoint cost, side by side in one run (92M-parameter GPT-2, fp32, ZeRO-2, 2 ranks):

1. synchronous save (write + fsync + checksum + atomic commit) ÷ raw `torch.save` of the same state on
   the same ranks. Goal <= 1.1. Reported with GB/s beside the disk's `dd ... conv=fdatasync` bandwidth.
2. training-loop stall of an async save (`checkpoint.async_save`) ÷ the synchronous save. Goal <= 0.10.
3. restart -> first resumed step ÷ cold start -> first step, whole `bigmodel launch local` processes.
   Goal <= 1.2.

    python -m benchmarks.checkpoint [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = "gpt2-124m"
MODEL = ["--model.vocab_size=8192", "--data.max_bytes=4000000", "--data.seq_len=256",
         "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.precision=fp32",
         "--deepspeed.config=zero2", "--train.eval_every=0", "--logging.wandb_mode=disabled", "--train.log_every=1"]


def _worker(args: argparse.Namespace) -> None:

    from bigmodel_dist.config import load_config
    from bigmodel_dist.distributed import facts_from_env
    from bigmodel_dist.session import open_trainer

    facts = facts_from_env()
    cfg = load_config(None, [*MODEL, f"--model.preset={args.preset}", f"--output_dir={args.workdir}", f"--data.cache_dir={args.cache}", "--name=save",
                             "--train.max_steps=1", "--checkpoint.every=0", "--checkpoint.keep_last=100"])
    with open_trainer(cfg, facts) as trainer:
        _measure_saves(trainer, facts, args)


def _measure_saves(trainer, facts, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    trainer.train()  # one step: optimizer states exist; saves step 1
    engine = trainer.runtime.engine

    def timed_save(step: int) -> float:
        trainer.state.step = step
        dist.barrier()
        started = time.perf_counter()
        trainer.save_checkpoint()
        return time.perf_counter() - started

    ours, raw = [], []
    for i in range(args.repeats):
        ours.append(timed_save(100 + i))
        state = {"optimizer": engine.optimizer.state_dict()}
        if facts.is_main:
            state["module"] = engine.module.state_dict()
        target = Path(args.workdir) / f"raw-{i}-rank{facts.rank}.pt"
        dist.barrier()
        started = time.perf_counter()
        torch.save(state, target)
        dist.barrier()
        raw.append(time.perf_counter() - started)
    # The same saves with checkpoint.async_save: the loop stalls only for the host-memory snapshot.
    from bigmodel_dist.checkpoint.snapshot_engine import SnapshotCheckpointEngine
    from bigmodel_dist.runtime import replace_checkpoint_engine

    trainer.cfg.checkpoint.async_save = True
    replace_checkpoint_engine(engine, SnapshotCheckpointEngine)
    stalls = []
    for i in range(args.repeats):
        stalls.append(timed_save(200 + i))
        trainer.checkpoints.settle()  # measure each stall alone, not behind the previous write
        dist.barrier()
    ckpt = trainer.run_dir / "checkpoints" / "step_00000100"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    if facts.is_main:
        Path(args.out).write_text(json.dumps({"ours": ours, "raw": raw, "async_stall": stalls, "bytes": size}))


def _disk_bandwidth(folder: Path) -> float:
    target = folder / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=1024", "conv=fdatasync"],
                         capture_output=True, text=True).stderr
    target.unlink(missing_ok=True)
    match = re.search(r"([\d.]+) GB/s", out) or re.search(r"([\d.]+) MB/s", out)
    return float(match.group(1)) / (1000 if "MB/s" in match.group(0) else 1)


def _first_step_seconds(workdir: Path, cache: str, steps: int, preset: str) -> float:
    """Launch to the first logged training step of this launch (cold start, or resume when a checkpoint exists)."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "local", str(REPO / "configs" / "gpt2-tiny.yaml"),
                    "--nproc-per-node=2", *MODEL, f"--model.preset={preset}", f"--output_dir={workdir}", f"--data.cache_dir={cache}",
                    "--name=restart", f"--train.max_steps={steps}", "--checkpoint.every=1"],
                   check=True, cwd=REPO, capture_output=True)
    records = [json.loads(line) for line in (workdir / "restart" / "metrics.jsonl").read_text().splitlines()]
    return min(r["time"] for r in records if "loss" in r and r["time"] >= started) - started


def saving_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that saves the 92M model from 2 ranks (this one, benchmarks/elastic.py):
    the public ones and those its torchrun worker processes get."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model (default gpt2-124m: 92M with vocab 8192)")
    parser.add_argument("--cache", default=str(REPO / "runs" / ".cache"))
    return parser


def run_saving_workers(module: str, args: argparse.Namespace, out: Path, workdir: Path) -> None:
    """`module --worker` on 2 torchrun ranks (one thread each), passing on the parsed options."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", module, "--worker", f"--out={out}", f"--workdir={workdir}", f"--repeats={args.repeats}",
                    f"--cache={args.cache}", f"--preset={args.preset}"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> int:
    args = saving_benchmark_parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    (REPO / "runs").mkdir(exist_ok=True)  # same disk as real runs
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=REPO / "runs") as tmp:
        work = Path(tmp)
        out = work / "save.json"
        run_saving_workers("benchmarks.checkpoint", args, out, work)
        save = json.loads(out.read_text())
        disk = _disk_bandwidth(work)
        cold = _first_step_seconds(work, args.cache, steps=2, preset=args.preset)
        restart = _first_step_seconds(work, args.cache, steps=3, preset=args.preset)
    ours, raw = statistics.median(save["ours"]), statistics.median(save["raw"])
    stall = statistics.median(save["async_stall"])
    gb = save["bytes"] / 1e9
    rows = [
        {"figure": "sync save ÷ raw torch.save", "ratio": ours / raw, "goal": "<= 1.1",
         "detail": f"{ours:.2f}s vs {raw:.2f}s for {gb:.2f} GB: {gb / ours:.2f} vs {gb / raw:.2f} GB/s (disk {disk:.2f} GB/s)"},
        {"figure": "async save stall ÷ sync save", "ratio": stall / ours, "goal": "<= 0.10",
         "detail": f"{stall:.2f}s vs {ours:.2f}s"},
        {"figure": "restart ÷ cold start (to step)", "ratio": restart / cold, "goal": "<= 1.2",
         "detail": f"{restart:.1f}s vs {cold:.1f}s"},
    ]
    report("checkpoint", f"checkpoint ({args.preset} fp32, ZeRO-2, 2 ranks)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
