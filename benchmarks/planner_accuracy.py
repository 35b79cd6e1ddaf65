"""Planner accuracy: measured ÷ planned per-rank memory of model states at ZeRO 0-3.

    python -m benchmarks.planner_accuracy [--quick] [--precision fp32|bf16]

Two CPU ranks (torchrun, gloo) build the real DeepSpeed engine of each stage in turn and run one
training step; after the backward pass and after the optimizer step every live tensor is counted once
per storage (gc), minus what was alive before the engine existed. The peak of those is "measured";
"planned" is `bigmodel_dist.run.planner`'s params + grads + optimizer for the same run. Buckets, ZeRO-3's
gathered working set and activations live only inside forward/backward, where nothing on CPU records
the peak: `benchmarks/gpu_throughput.py` compares the GPU allocator's peak with the whole plan.
Goal: 0.85 <= measured ÷ planned <= 1.15. --quick: the tiny model only (CI).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import report

MODELS = ("gpt2-tiny", "gpt2-24m")
STAGES = (0, 1, 2, 3)


def live_tensor_bytes() -> int:
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse) or half-built objects
            continue
    return sum(storages.values())


def overrides_for(preset: str, precision: str, stage: int) -> list[str]:
    return [f"--model.preset={preset}", f"--train.precision={precision}", f"--deepspeed.config=zero{stage}",
            "--data.seq_len=64", "--train.global_batch_size=2", "--train.micro_batch_size=1",
            "--logging.wandb_mode=disabled"]


def _measure_stage(preset: str, precision: str, stage: int) -> dict:
    """On every rank: build the stage's engine, one step, peak live-tensor bytes above the baseline."""
    import torch

    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.model.build import build_model, weight_decay_groups
    from bigmodel_dist.model.engine import create_accelerator, prepare
    from bigmodel_dist.run.resolve import resolve_run

    facts = facts_from_env()
    resolved = resolve_run(load_config(None, overrides_for(preset, precision, stage)), facts.world_size)
    gc.collect()
    baseline = live_tensor_bytes()
    accelerator = create_accelerator(resolved.deepspeed_config, precision)
    model = build_model(resolved.config.model, resolved.config.seed)
    runtime = prepare(accelerator, model, weight_decay_groups(model, 0.1), 1e-4)
    del model
    batch = torch.randint(0, resolved.shape.vocab_size, (1, resolved.config.data.seq_len))
    measured = {}
    for step in (1, 2):  # Adam's states appear in the first step; the second shows the steady state
        loss = runtime.engine(input_ids=batch, labels=batch).loss
        runtime.engine.backward(loss)
        del loss
        gc.collect()
        measured[f"step{step}_after_backward"] = live_tensor_bytes() - baseline
        runtime.engine.step()
        gc.collect()
        measured[f"step{step}_after_step"] = live_tensor_bytes() - baseline
    runtime.engine.destroy()
    del runtime, accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the next stage gets its own Accelerator (and DeepSpeed plugin)
    gc.collect()
    return measured


def worker(preset: str, precision: str, out: str) -> None:
    from bigmodel_dist.core.distributed import facts_from_env
    from launcher.logs import setup_logging

    facts = facts_from_env()
    setup_logging(facts.rank, facts.world_size)
    results = {stage: _measure_stage(preset, precision, stage) for stage in STAGES}
    if facts.is_main:
        Path(out).write_text(json.dumps(results))


def planned_bytes(preset: str, precision: str, stage: int, ranks: int) -> float:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.run.planner import Hardware, Variant, plan_run
    from bigmodel_dist.run.resolve import resolve_run

    resolved = resolve_run(load_config(None, overrides_for(preset, precision, stage)), ranks)
    plans = {p.variant: p for p in plan_run(resolved, Hardware(gpus=ranks))}
    gpu = plans[Variant(stage).name].gpu
    return gpu["params"] + gpu["grads"] + gpu["optimizer"]


def measure(preset: str, precision: str, ranks: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measured.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "benchmarks.planner_accuracy", "--worker", preset, precision, str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    rows = []
    for preset in MODELS[:1] if args.quick else MODELS:
        measured = measure(preset, args.precision)
        for stage in STAGES:
            peak = max(measured[stage].values())
            planned = planned_bytes(preset, args.precision, stage, 2)
            rows.append({"figure": f"{preset} {args.precision} ZeRO-{stage} measured÷planned", "ratio": peak / planned,
                         "goal": "0.85-1.15", "detail": f"{peak / 2**20:.1f} vs {planned / 2**20:.1f} MiB per rank"})
    report("planner_accuracy", "Planner: per-rank model states, 2 CPU ranks", rows)
    outside = [row["figure"] for row in rows if not 0.85 <= row["ratio"] <= 1.15]
    if outside:  # the planner is wrong, not the machine slow: fail (CI runs this in quick mode)
        print(f"planner off by more than 15%: {outside}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
