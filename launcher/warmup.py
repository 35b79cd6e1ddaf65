"""Build the DeepSpeed JIT ops a run on this machine will load, once, so the first run does not stall.

`python -m launcher.warmup` is run by `make setup` and CI; `--offload` also builds CPU Adam, which only
the optimizer-offload configs (zero2-offload, zero3-offload, zero3-nvme) load. Builds land in
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and are reused by every later process; each
costs 60-100 s of compiling on a 2-core CPU, so nothing is built that the run will not use.
"""

from __future__ import annotations

import argparse
import sys
import time


def ops_to_build(has_cuda: bool, offload: bool) -> list[str]:
    """The op builders a run loads: GPU runs DeepSpeed's fused Adam; CPU runs torch's fused AdamW
    (bigmodel_dist/config/deepspeed.py) and the shared-memory all-reduce that DeepSpeed's CPU comm uses."""
    ops = ["FusedAdamBuilder"] if has_cuda else ["ShareMemCommBuilder"]
    return [*ops, "CPUAdamBuilder"] if offload else ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.warmup", description=__doc__.splitlines()[0])
    parser.add_argument("--offload", action="store_true", help="also build CPU Adam (optimizer offload configs)")
    args = parser.parse_args(argv)
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    failed = 0
    for name in ops_to_build(torch.cuda.is_available(), args.offload):
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"warmup: {name}: not used on {accelerator.device_name()}")
            continue
        started = time.perf_counter()
        try:
            builder.load()
            print(f"warmup: {name}: ready ({time.perf_counter() - started:.0f}s)")
        except Exception as exc:  # report every op, then fail
            failed += 1
            print(f"warmup: {name}: build failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
