"""bf16 ÷ fp32 step time on this machine, beside what `train.precision: auto` picks here.

A plain PyTorch training step (forward, backward, AdamW) of the tiny GPT-2 at micro-batch 4 x 256,
its weights in bf16 (as DeepSpeed's bf16 mode computes) and in fp32, timed alternately in one process
so machine noise hits both alike. On CPUs without native bf16 (AVX2 only) bf16 is emulated and ~4x
slower: there "auto" must pick fp32 (ratio > 1); with AVX512-BF16/AMX or a GPU, bf16 (ratio < 1).

    python -m benchmarks.precision [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.report import report


def step_seconds(dtype, steps: int, seed: int = 0) -> float:
    """Median seconds of one training step of gpt2-tiny with weights and activations in `dtype`."""
    import torch

    from bigmodel_dist.config.schema import ModelConfig
    from bigmodel_dist.model.build import build_model

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(ModelConfig(preset="gpt2-tiny", vocab_size=512, dropout=0.0), seed).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 512, (4, 256), device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms caches and allocators: not counted
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per dtype and round")
    parser.add_argument("--rounds", type=int, default=3, help="fp32/bf16 alternations")
    args = parser.parse_args(argv)
    import torch

    from bigmodel_dist.run.precision import choose_precision, detect_device

    fp32, bf16 = [], []
    for _ in range(args.rounds):
        fp32.append(step_seconds(torch.float32, args.steps))
        bf16.append(step_seconds(torch.bfloat16, args.steps))
    ratio = statistics.median(bf16) / statistics.median(fp32)
    device = detect_device()
    chosen, reason = choose_precision("auto", device)
    faster = "bf16" if ratio < 1 else "fp32"
    verdict = "agrees" if chosen == faster else "DISAGREES"
    report("precision", f"Precision on {device.name}: bf16 step ÷ fp32 step (auto picks {chosen}: {reason})", [{
        "figure": "bf16 ÷ fp32 step time", "ratio": ratio, "goal": "info",
        "detail": f"{statistics.median(bf16):.3f}s vs {statistics.median(fp32):.3f}s per step; "
                  f"auto picks {chosen}, {verdict} with the faster one here"}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
