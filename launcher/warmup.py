"""Build DeepSpeed's JIT-compiled ops once per machine (60-100 s on CPU), so the first run does not stall.

`python -m launcher.warmup` is run by `make setup` and CI. The builds land in TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions) and are reused by every later process.
"""

from __future__ import annotations

import sys
import time

# The ops a run can touch: the DeepSpeed JSON's Adam (fused), CPU offload's Adam, CPU shared-memory comm.
OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder")


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    failed = 0
    for name in OPS:
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
