"""What a resize costs in checkpoint work (92M-parameter GPT-2, fp32, ZeRO-2, 2 ranks):

the universal-checkpoint conversion a resume on another world size needs (DeepSpeed's
`ds_to_universal` plus our additions, `bigmodel_dist/checkpoint/reshard.py`), timed for a shrink to 1
rank and a grow to 4, each ÷ the plain synchronous save of the same checkpoint. Goal (report) <= 2.
The conversion is cached per checkpoint and target size: only the first start on a new size pays it.

    python -m benchmarks.elastic [--preset gpt2-124m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.checkpoint import MODEL, saving_benchmark_parser, saving_workers_run
from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
TARGETS = (1, 4)  # world sizes converted to: a lost rank, and growing


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from bigmodel_dist.checkpoint.integrity import read_checkpoint_meta
    from bigmodel_dist.checkpoint.reshard import convert_for, universal_cache_dir
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.training.session import open_trainer

    facts = facts_from_env()
    cfg = load_config(None, [*MODEL, f"--model.preset={args.preset}", f"--output_dir={args.workdir}",
                             f"--data.cache_dir={args.cache}", "--name=resize", "--train.max_steps=1",
                             "--checkpoint.every=0", "--checkpoint.keep_last=100"])
    with open_trainer(cfg, facts) as trainer:
        trainer.train()  # one step: optimizer states exist
        saves, paths = [], []
        for i in range(args.repeats):
            trainer.state.step = 100 + i
            dist.barrier()
            started = time.perf_counter()
            paths.append(trainer.save_checkpoint())
            saves.append(time.perf_counter() - started)
        dist.barrier()
    if not facts.is_main:
        return
    conversions: dict[int, list[float]] = {target: [] for target in TARGETS}
    for path in paths:
        meta, _ = read_checkpoint_meta(path)
        for target in TARGETS:
            started = time.perf_counter()
            convert_for(path, meta, target, 2, cfg.train.precision)
            conversions[target].append(time.perf_counter() - started)
            shutil.rmtree(universal_cache_dir(path), ignore_errors=True)  # each target converts afresh
    size = sum(p.stat().st_size for p in paths[0].rglob("*") if p.is_file())
    Path(args.out).write_text(json.dumps({"saves": saves, "conversions": conversions, "bytes": size}))


def main(argv: list[str] | None = None) -> int:
    args = saving_benchmark_parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    with saving_workers_run("benchmarks.elastic", args) as (_, measured):
        pass  # the workers measured everything
    save = statistics.median(measured["saves"])
    gb = measured["bytes"] / 1e9
    rows = [{"figure": f"universal conversion to {target} rank(s) ÷ save", "ratio": statistics.median(times) / save,
             "goal": "<= 2 (report)",
             "detail": f"{statistics.median(times):.2f}s vs {save:.2f}s for {gb:.2f} GB (2 ranks, ZeRO-2)"}
            for target, times in ((int(k), v) for k, v in measured["conversions"].items())]
    report("elastic", f"resize cost ({args.preset} fp32, ZeRO-2, 2 ranks)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
