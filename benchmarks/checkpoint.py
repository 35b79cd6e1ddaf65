"""Checkpoint cost, side by side in one run (92M-parameter GPT-2, fp32, ZeRO-2, 2 ranks, 1.47 GB):

1. durable save bandwidth (ours: write + fsync + checksum + atomic commit) ÷ the disk's own
   `dd ... conv=fdatasync` bandwidth, measured between the saves. Goal >= 0.8.
2. our synchronous save ÷ raw `torch.save` + `fsync` of the same state on the same ranks. Goal <= 1.1.
3. DeepSpeed's engines on the same state, each through `engine.save_checkpoint`: TorchCheckpointEngine
   (its default, no fsync), FastCheckpointEngine with the python writer (FastPersist's `fast` writer needs
   a GPU's pinned memory and libaio) and DecoupledCheckpointEngine (writes in a spawned process).
4. training-loop stall of an async save (`checkpoint.async_save`) ÷ the synchronous save. Goal <= 0.10,
   with the staging memory per rank.
5. restart -> first resumed step ÷ cold start -> first step, whole `bigmodel launch local` processes
   (goal <= 1.2), and the restart's load bandwidth ÷ the disk's read bandwidth: checkpoint bytes ÷ the
   checkpoint's share of the start-up's critical path (choice, waiting for the checksums that run while
   the engine is built, DeepSpeed's load), page cache dropped.

    python -m benchmarks.checkpoint [--repeats 3] [--write-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from benchmarks.report import report
from bigmodel_dist.core.fileio import fsync_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = "gpt2-124m"
MODEL = ["--model.vocab_size=8192", "--data.max_bytes=4000000", "--data.seq_len=256",
         "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.precision=fp32",
         "--deepspeed.config=zero2", "--train.eval_every=0", "--logging.wandb_mode=disabled", "--train.log_every=1"]
DISK_PROBE_BYTES = 1 << 30
# data_parallel=replica: the only setting that builds a writer on every rank of a pure data-parallel run
# (0.19.8); swapped in after start-up, the model file is still written by rank 0 alone, as with ours.
FAST_PYTHON_WRITER = {"type": "python", "data_parallel": "replica"}


def _worker(args: argparse.Namespace) -> None:

    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.training.session import open_trainer

    facts = facts_from_env()
    cfg = load_config(None, [*MODEL, f"--model.preset={args.preset}", f"--output_dir={args.workdir}", f"--data.cache_dir={args.cache}", "--name=save",
                             "--train.max_steps=1", "--checkpoint.every=0", "--checkpoint.keep_last=100",
                             f"--checkpoint.write_threads={getattr(args, 'write_threads', 0)}"])
    with open_trainer(cfg, facts) as trainer:
        _measure_saves(trainer, facts, args)


def _deepspeed_engine(engine, writer: dict | None):
    """A checkpoint engine as DeepSpeed builds it from a `checkpoint.writer` block (None: its default)."""
    from deepspeed.runtime.checkpoint_engine import create_checkpoint_engine
    from deepspeed.runtime.model_checkpointing.config import get_checkpoint_writer_config
    from deepspeed.utils import groups

    engine._config.checkpoint_config["writer"] = None if writer is None else get_checkpoint_writer_config({"writer": writer})
    return create_checkpoint_engine(engine._config, groups, engine.zero_optimization_stage(), engine.has_moe_layers,
                                    not engine.zero_optimization_partition_weights())


def _measure_saves(trainer, facts, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    trainer.train()  # one step: optimizer states exist; saves step 1
    engine, work = trainer.runtime.engine, Path(args.workdir)
    ours_engine = engine.checkpoint_engine
    results: dict[str, list[float]] = {key: [] for key in ("disk", "ours", "raw_fsync", "raw", "ds_torch", "ds_fast",
                                                           "ds_torch_fsync", "ds_fast_fsync")}

    def timed(action, settle: bool = True) -> float:
        if settle and facts.is_main:
            os.sync()  # each measurement starts with no dirty pages left by the one before
        dist.barrier()
        started = time.perf_counter()
        action()
        dist.barrier()
        return time.perf_counter() - started

    def our_save(step: int) -> None:
        trainer.state.step = step
        trainer.save_checkpoint()

    def raw_save(target: Path, durable: bool) -> None:
        state = {"optimizer": engine.optimizer.state_dict()}
        if facts.is_main:
            state["module"] = engine.module.state_dict()
        torch.save(state, target)
        if durable:
            fsync_path(target)

    def deepspeed_save(writer: dict | None, folder: Path) -> tuple[float, float]:
        """DeepSpeed's engine saving the same state: its own time, and that plus an fsync of every file
        it wrote (what a durable save of it would cost)."""
        engine.checkpoint_engine = _deepspeed_engine(engine, writer)
        try:
            saved = timed(lambda: engine.save_checkpoint(str(folder), tag="t"))
            synced = timed(lambda: [fsync_path(f) for f in folder.rglob("*") if f.is_file()] if facts.is_main else None,
                           settle=False)
            return saved, saved + synced
        finally:
            engine.checkpoint_engine = ours_engine

    for i in range(args.repeats):  # interleaved, so a noisy disk weighs on every figure alike
        scratch = work / f"scratch-{i}"
        if facts.is_main:
            scratch.mkdir()
            results["disk"].append(_disk_write_bandwidth(scratch))
        results["ours"].append(timed(partial(our_save, 100 + i)))
        results["raw_fsync"].append(timed(partial(raw_save, scratch / f"raw-fsync-rank{facts.rank}.pt", True)))
        results["raw"].append(timed(partial(raw_save, scratch / f"raw-rank{facts.rank}.pt", False)))
        for name, writer in (("ds_torch", None), ("ds_fast", FAST_PYTHON_WRITER)):
            saved, durable = deepspeed_save(writer, scratch / name)
            results[name].append(saved)
            results[f"{name}_fsync"].append(durable)
        dist.barrier()
        if facts.is_main:
            shutil.rmtree(scratch)
    decoupled = _decoupled_save(engine, ours_engine, work / "ds-decoupled", timed)

    # The same saves with checkpoint.async_save: the loop stalls only for the copy into staging buffers.
    trainer.cfg.checkpoint.async_save = True
    trainer.checkpoints.install_engine(engine)
    stalls, written = [], []
    for i in range(args.repeats + 1):  # the first allocates the staging buffers; the others reuse them
        stalls.append(timed(partial(our_save, 200 + i)))
        written.append(stalls[-1] + timed(trainer.checkpoints.settle))  # save start -> committed
    staging = [0] * facts.world_size
    dist.all_gather_object(staging, engine.checkpoint_engine.staging_bytes)
    from bigmodel_dist.run.planner import async_staging_bytes, variant_of

    resolved = trainer.resolved
    planned_staging = async_staging_bytes(resolved.num_parameters, variant_of(resolved.deepspeed_config),
                                          trainer.cfg.train.precision, facts.world_size, facts.local_world_size)
    ckpt = trainer.run_dir.checkpoints / "step_00000100"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    if facts.is_main:
        Path(args.out).write_text(json.dumps({**results, "decoupled": decoupled, "async_stall": stalls,
                                              "async_written": written, "staging_bytes": staging, "bytes": size,
                                              "planned_staging_bytes": planned_staging,
                                              "write_threads": trainer.checkpoints.write_threads}))


def _decoupled_save(engine, ours_engine, folder: Path, timed) -> dict:
    """DeepSpeed's DecoupledCheckpointEngine: the stall of `save_checkpoint`, and the time until its
    writer process has committed (DeepSpeed waits for that at the next optimizer step)."""
    try:
        engine.checkpoint_engine = _deepspeed_engine(engine, {**FAST_PYTHON_WRITER, "decoupled": True})
        stall = timed(lambda: engine.save_checkpoint(str(folder), tag="t"))
        committed = stall + timed(engine._commit_decoupled_checkpoint)
        engine.checkpoint_engine.cleanup()
        return {"stall": stall, "committed": committed}
    except Exception as exc:  # reported as a row that did not run, with the reason
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}
    finally:
        engine.checkpoint_engine = ours_engine


def _disk_write_bandwidth(folder: Path) -> float:
    """GB/s of `dd if=/dev/zero bs=1M conv=fdatasync` into a new file."""
    target = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={DISK_PROBE_BYTES >> 20}", "conv=fdatasync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    target.unlink()
    return DISK_PROBE_BYTES / elapsed / 1e9


def _drop_cached(folder: Path) -> None:
    """Evict the files under `folder` from the page cache (they are clean: written and synced)."""
    for path in (p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _disk_read_bandwidth(folder: Path) -> float:
    """GB/s reading a new, synced file after evicting it from the page cache."""
    target = folder / "read-probe.bin"
    subprocess.run(["dd", "if=/dev/urandom", f"of={target}", "bs=1M", f"count={DISK_PROBE_BYTES >> 20}", "conv=fdatasync"],
                   check=True, capture_output=True)
    _drop_cached(folder)
    started = time.perf_counter()
    with open(target, "rb", buffering=0) as handle:
        while handle.read(8 << 20):
            pass
    elapsed = time.perf_counter() - started
    target.unlink()
    return DISK_PROBE_BYTES / elapsed / 1e9


def _cold_and_restart(workdir: Path, args: argparse.Namespace) -> dict:
    """A cold start to the first step, then a restart that resumes from its checkpoint (page cache
    dropped): both times, the restart's start-up phases and the checkpoint's size."""
    cold, cold_phases = _first_step_seconds(workdir, args.cache, steps=2, preset=args.preset)
    checkpoints = workdir / "restart" / "checkpoints"
    loaded = sum(p.stat().st_size for p in (checkpoints / "step_00000002").rglob("*") if p.is_file())
    _drop_cached(checkpoints)
    restart, phases = _first_step_seconds(workdir, args.cache, steps=3, preset=args.preset)
    shutil.rmtree(workdir)
    return {"cold": cold, "restart": restart, "phases": phases, "cold_phases": cold_phases, "bytes": loaded}


def _first_step_seconds(workdir: Path, cache: str, steps: int, preset: str) -> tuple[float, dict]:
    """Launch to the first logged training step of this launch (cold start, or resume when a checkpoint
    exists), and that launch's start-up phases."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", "launch", "local", str(REPO / "configs" / "gpt2-tiny.yaml"),
                    "--nproc-per-node=2", *MODEL, f"--model.preset={preset}", f"--output_dir={workdir}", f"--data.cache_dir={cache}",
                    "--name=restart", f"--train.max_steps={steps}", "--checkpoint.every=1"],
                   check=True, cwd=REPO, capture_output=True)
    records = [json.loads(line) for line in (workdir / "restart" / "metrics.jsonl").read_text().splitlines()]
    first_step = min(r["time"] for r in records if "loss" in r and r["time"] >= started)
    phases = next((r for r in records if "startup/total_s" in r and r["time"] >= started), {})
    return first_step - started, phases


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
    parser.add_argument("--write-threads", type=int, default=0, help="checkpoint.write_threads (0: automatic)")
    return parser


@contextmanager
def saving_workers_run(module: str, args: argparse.Namespace) -> Iterator[tuple[Path, dict]]:
    """`module --worker` on 2 torchrun ranks (one thread each, the parsed options passed on) in a scratch
    folder under runs/ (the disk real runs use): that folder and what the workers measured (the JSON
    rank 0 wrote to `--out`), while the caller measures more there."""
    (REPO / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bench-{module.rsplit('.', 1)[-1]}-", dir=REPO / "runs") as tmp:
        workdir, out = Path(tmp), Path(tmp) / "measured.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", module, "--worker", f"--out={out}", f"--workdir={workdir}", f"--repeats={args.repeats}",
                        f"--cache={args.cache}", f"--preset={args.preset}", f"--write-threads={args.write_threads}"],
                       # CROSS_*: what DeepSpeed's launcher exports and its FastPersist engines read (one node)
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "CROSS_SIZE": "1", "CROSS_RANK": "0"})
        yield workdir, json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = saving_benchmark_parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    with saving_workers_run("benchmarks.checkpoint", args) as (work, save):
        shutil.rmtree(work / "save")
        disk_read = _disk_read_bandwidth(work)
        starts = [_cold_and_restart(work / f"start-{i}", args) for i in range(min(args.repeats, 2))]
    _report(save, disk_read, starts, args)
    return 0


def _phase_differences(restart: dict, cold: dict) -> str:
    """The start-up phases that differ by more than 0.2 s between a restart and a cold start."""
    names = [k for k in restart if k.startswith("startup/") and k != "startup/total_s"]
    differences = {k[len("startup/"):-len("_s")]: restart[k] - cold.get(k, 0.0) for k in names}
    return ", ".join(f"{name} {delta:+.1f}s" for name, delta in differences.items() if abs(delta) > 0.2) or "none"


def _report(save: dict, disk_read: float, starts: list[dict], args: argparse.Namespace) -> None:
    median = statistics.median
    restart_ratio = median(s["restart"] / s["cold"] for s in starts)
    cold, restart = median(s["cold"] for s in starts), median(s["restart"] for s in starts)
    phases, loaded_bytes = starts[-1]["phases"], starts[-1]["bytes"]
    gb, disk = save["bytes"] / 1e9, median(save["disk"])
    ours, raw_fsync, raw = median(save["ours"]), median(save["raw_fsync"]), median(save["raw"])
    steady_stall = median(save["async_stall"][1:])
    load_phases = {name: phases.get(f"startup/checkpoint_{name}_s", 0.0) for name in ("choice", "checks", "load")}
    load_s = sum(load_phases.values())
    load_gbs = loaded_bytes / 1e9 / load_s if load_s else 0.0

    def runs(key: str) -> str:
        return "/".join(f"{seconds:.2f}" for seconds in save[key])

    def speed(seconds: float) -> str:
        return f"{seconds:.2f}s = {gb / seconds:.2f} GB/s"

    decoupled = save["decoupled"]
    decoupled_detail = (f"stall {decoupled['stall']:.2f}s, committed after {speed(decoupled['committed'])}"
                        if "stall" in decoupled else f"did not run: {decoupled['error']}")
    rows = [
        {"figure": "durable save ÷ disk bandwidth", "ratio": gb / ours / disk, "goal": ">= 0.8",
         "detail": f"ours {speed(ours)} vs dd conv=fdatasync {disk:.2f} GB/s (runs {', '.join(f'{d:.2f}' for d in save['disk'])})"},
        {"figure": "sync save ÷ torch.save + fsync", "ratio": ours / raw_fsync, "goal": "<= 1.1",
         "detail": f"{speed(ours)} vs {speed(raw_fsync)} (runs {runs('ours')} vs {runs('raw_fsync')}); torch.save "
                   f"alone (not durable) {speed(raw)}"},
        {"figure": "DeepSpeed Torch engine ÷ ours", "ratio": median(save["ds_torch_fsync"]) / ours, "goal": "report",
         "detail": f"TorchCheckpointEngine + fsync {speed(median(save['ds_torch_fsync']))} (alone, not durable: "
                   f"{speed(median(save['ds_torch']))}); no checksums, no commit"},
        {"figure": "DeepSpeed Fast engine ÷ ours", "ratio": median(save["ds_fast_fsync"]) / ours, "goal": "report",
         "detail": f"FastCheckpointEngine writer=python + fsync {speed(median(save['ds_fast_fsync']))} (alone, not "
                   f"durable: {speed(median(save['ds_fast']))}); writer=fast needs a GPU"},
        {"figure": "DeepSpeed Decoupled stall ÷ ours", "ratio": decoupled.get("stall", float("nan")) / ours,
         "goal": "report", "detail": f"DecoupledCheckpointEngine writer=python: {decoupled_detail}"},
        {"figure": "async save stall ÷ sync save", "ratio": steady_stall / ours, "goal": "<= 0.10",
         "detail": f"{steady_stall:.2f}s vs {ours:.2f}s (first save, allocating the buffers: {save['async_stall'][0]:.2f}s); "
                   f"staging {max(save['staging_bytes']) / 1e9:.2f} GB per rank at most; written and committed after "
                   f"{median(save['async_written'][1:]):.2f}s"},
        {"figure": "async staging ÷ planned", "ratio": sum(save["staging_bytes"]) / save["planned_staging_bytes"],
         "goal": "0.9-1.1", "detail": f"{sum(save['staging_bytes']) / 1e9:.3f} GB host memory on the node vs "
                                      f"`bigmodel plan` {save['planned_staging_bytes'] / 1e9:.3f} GB"},
        {"figure": "restart ÷ cold start (to step)", "ratio": restart_ratio, "goal": "<= 1.2",
         "detail": f"{restart:.1f}s vs {cold:.1f}s (medians of {len(starts)} pairs: "
                   f"{', '.join(format(s['restart'] / s['cold'], '.2f') for s in starts)}; restart - cold by phase: "
                   f"{_phase_differences(starts[-1]['phases'], starts[-1]['cold_phases'])})"},
        {"figure": "load bandwidth ÷ disk read", "ratio": load_gbs / disk_read if disk_read else 0.0, "goal": "report",
         "detail": f"{loaded_bytes / 1e9:.2f} GB verified and loaded in {load_s:.2f}s = {load_gbs:.2f} GB/s "
                   f"({', '.join(f'{k} {v:.2f}s' for k, v in load_phases.items())}), page cache dropped; disk reads "
                   f"{disk_read:.2f} GB/s"},
    ]
    report("checkpoint", f"checkpoint ({args.preset} fp32, ZeRO-2, 2 ranks, {save['write_threads']} write thread(s) "
           f"per rank, {args.repeats} repeats, medians)", rows)


if __name__ == "__main__":
    sys.exit(main())
