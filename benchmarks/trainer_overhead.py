"""Trainer overhead: the trainer's step time / a bare DeepSpeed loop's, same model, data and ZeRO config.

Both run inside the same 2-process group, interleaved in blocks (trainer, bare, trainer, bare, ...) so
machine noise hits both alike; the first block of each is warm-up. Reports the median step time of
each over >= 20 steps and their ratio, for fp32 and bf16. Goal: ratio <= 1.03.

    python -m benchmarks.trainer_overhead [--preset gpt2-mini] [--zero 2] [--blocks 4] [--block-steps 8]
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

GOAL = 1.03


def _worker(args: argparse.Namespace) -> None:

    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.training.session import open_trainer
    from launcher.logs import setup_logging

    facts = facts_from_env()
    setup_logging(facts.rank, facts.world_size)
    cfg = load_config(None, [
        f"--model.preset={args.preset}", f"--deepspeed.zero_stage={args.zero}", f"--train.precision={args.precision}",
        "--train.global_batch_size=16", "--train.micro_batch_size=4", "--data.seq_len=256",
        "--data.max_bytes=4000000", f"--output_dir={args.workdir}", f"--data.cache_dir={args.cache}",
        f"--name=overhead-{args.precision}", "--train.log_every=1", "--train.eval_every=0", "--checkpoint.every=0",
        "--logging.wandb_mode=disabled", "--model.dropout=0.0", "--optim.warmup_steps=2",
        f"--train.max_steps={args.blocks * args.block_steps}",
    ])
    with open_trainer(cfg, facts) as trainer:
        _compare(trainer, facts, args)


def _compare(trainer, facts, args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from bigmodel_dist.model.build import build_model, weight_decay_groups

    cfg, resolved = trainer.cfg, trainer.resolved

    model = build_model(cfg.model, cfg.seed, eos_token_id=trainer.parts.tokenizer.eos_token_id)
    bare, *_ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(model, cfg.optim.weight_decay),
                                    config=resolved.deepspeed_config)
    layout = resolved.layout

    from bigmodel_dist.data.batch_loader import BatchLoader

    def bare_step(loader: BatchLoader, step: int) -> float:
        started = time.perf_counter()
        for micro_step in range(layout.grad_accum_steps):
            batch = loader.next(step, micro_step)  # the same samples as the trainer's, same prefetching
            loss = bare(input_ids=batch, labels=batch).loss
            bare.backward(loss)
            bare.step()
        return time.perf_counter() - started

    trainer_times: list[float] = []
    bare_times: list[float] = []
    metrics_file = resolved.run_dir.metrics
    for block in range(args.blocks):
        cfg.train.max_steps = (block + 1) * args.block_steps  # the trainer continues where it stopped
        trainer.train()
        records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r][-args.block_steps:]
        first = block * args.block_steps
        loader = BatchLoader(trainer.parts.dataset.train, layout, facts.rank, cfg.seed, start_step=first,
                             prefetch=cfg.data.prefetch)
        bare_block = [bare_step(loader, first + i) for i in range(args.block_steps)]
        loader.close()
        if block > 0:  # block 0 is warm-up for both
            trainer_times += times
            bare_times += bare_block
    torch.distributed.barrier()
    if facts.is_main:
        Path(args.out).write_text(json.dumps({"trainer": trainer_times, "bare": bare_times}))


def _measure(precision: str, args: argparse.Namespace, workdir: str) -> dict:
    out = Path(workdir) / f"{precision}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "benchmarks.trainer_overhead", "--worker", f"--precision={precision}", f"--out={out}",
               f"--preset={args.preset}", f"--zero={args.zero}", f"--blocks={args.blocks}",
               f"--block-steps={args.block_steps}", f"--workdir={workdir}", f"--cache={args.cache}"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    times = json.loads(out.read_text())
    trainer, bare = statistics.median(times["trainer"]), statistics.median(times["bare"])
    return {"precision": precision, "steps_each": len(times["bare"]), "trainer_step_s": trainer,
            "bare_deepspeed_step_s": bare, "ratio": trainer / bare, "goal": GOAL}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--preset", default="gpt2-mini")
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="interleaved blocks; the first is warm-up")
    parser.add_argument("--block-steps", type=int, default=8)
    parser.add_argument("--cache", default=str(Path("runs/.cache").resolve()))
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="overhead-") as workdir:
        rows = [_measure(precision, args, workdir) for precision in ("fp32", "bf16")]
    print(f"\ntrainer overhead ({args.preset}, ZeRO-{args.zero}, 2 ranks, median of {rows[0]['steps_each']} steps each)")
    print(f"{'precision':<10}{'trainer s':>12}{'bare DS s':>12}{'ratio':>8}{'goal':>8}")
    for row in rows:
        print(f"{row['precision']:<10}{row['trainer_step_s']:>12.4f}{row['bare_deepspeed_step_s']:>12.4f}"
              f"{row['ratio']:>8.3f}{'<= ' + str(GOAL):>8}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_overhead.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
