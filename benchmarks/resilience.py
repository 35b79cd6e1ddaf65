"""What resilience costs and how fast it acts, on the CPU main job (configs/gpt2-tiny.yaml, 2 ranks).

1. Step time with every guard on (progress records for the hang watchdog, the per-step loss check
   with its all-reduce, straggler timing) / with them off: one 2-process group, one trainer, blocks
   alternating on/off so machine noise hits both alike; the first pair is warm-up. Goal <= 1.01.
2. Hang detection latency / the configured timeout: a rank made to hang inside step 5 under
   `launch local`; latency = the watchdog's declaration - that rank's last progress. Goal <= 1.1.
3. Health-check wall time, `bigmodel check` with 2 ranks (process start to exit). Goal <= 15 s.
4. A rollback's lost time: NaN batches poison steps 5-7 (`max_bad_steps=3`, checkpoints every 4
   steps): the steps redone and the seconds from the checkpoint's step to the rollback.

    python -m benchmarks.resilience [--blocks 6] [--block-steps 8] [--hang-timeout 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import report

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = str(REPO / "configs" / "gpt2-tiny.yaml")
GOALS = {"guards": 1.01, "hang": 1.1, "health_s": 15.0}


# ---- 1. guards on / off ------------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    from bigmodel_dist.config import load_config
    from bigmodel_dist.core.distributed import facts_from_env
    from bigmodel_dist.ft.progress import ProgressRecorder
    from bigmodel_dist.training.session import open_trainer
    from launcher.logs import setup_logging

    facts = facts_from_env()
    setup_logging(facts.rank, facts.world_size)
    cfg = load_config(MAIN_JOB, [
        f"--output_dir={args.workdir}", f"--data.cache_dir={args.cache}", "--name=guards", "--train.log_every=1",
        "--train.eval_every=0", "--checkpoint.every=0", "--logging.wandb_mode=disabled", "--train.precision=fp32",
        f"--train.max_steps={args.blocks * 2 * args.block_steps}",
    ])
    with open_trainer(cfg, facts) as trainer:
        cfg = trainer.cfg  # the resolved copy the trainer reads
        watched = trainer.hooks.progress  # records into BIGMODEL_PROGRESS_DIR, as under `launch local`
        unwatched = ProgressRecorder(None, facts.rank)
        times: dict[str, list[float]] = {"on": [], "off": []}
        metrics_file = trainer.resolved.run_dir.metrics
        for block in range(args.blocks * 2):
            guarded = block % 2 == 0
            cfg.resilience.enabled = guarded
            trainer.hooks.progress = watched if guarded else unwatched
            cfg.train.max_steps = (block + 1) * args.block_steps  # the trainer continues where it stopped
            trainer.train()
            records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
            block_times = [r["step_time_s"] for r in records if "step_time_s" in r][-args.block_steps:]
            if block >= 2:  # the first pair warms up
                times["on" if guarded else "off"] += block_times
        trainer.hooks.progress = watched
    if facts.is_main:
        Path(args.out).write_text(json.dumps(times))


def measure_guards(args: argparse.Namespace, workdir: str) -> dict:
    out = Path(workdir) / "guards.json"
    progress_dir = Path(workdir) / "progress"
    progress_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "benchmarks.resilience", "--worker", f"--out={out}", f"--workdir={workdir}",
               f"--cache={args.cache}", f"--blocks={args.blocks}", f"--block-steps={args.block_steps}"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                             "BIGMODEL_PROGRESS_DIR": str(progress_dir)})
    times = json.loads(out.read_text())
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"figure": "step time, guards on ÷ off", "ratio": on / off, "goal": f"<= {GOALS['guards']}",
            "detail": f"{on:.4f}s vs {off:.4f}s per step, median of {len(times['on'])} steps each"}


# ---- 2-4. launches with injected faults -----------------------------------------------------------------
def _launch(workdir: str, cache: str, faults: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launcher.cli", "launch", "local", MAIN_JOB, "--nproc-per-node=2",
               f"--output_dir={workdir}", f"--data.cache_dir={cache}", "--train.eval_every=0",
               "--logging.wandb_mode=disabled", "--train.log_every=1", "--train.precision=fp32", *overrides]
    env = {**os.environ, "BIGMODEL_FAULTS": faults, "BIGMODEL_ALLOW_FAULTS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def measure_hang(args: argparse.Namespace, workdir: str) -> dict:
    result = _launch(workdir, args.cache, "hang:rank=1,step=5", "--name=hang", "--train.max_steps=8",
                     "--checkpoint.every=4", f"--resilience.hang_timeout_s={args.hang_timeout}")
    (folder,) = (Path(workdir) / "hang" / "logs").glob("hang-*")
    report = json.loads((folder / "ranks.json").read_text())
    hung_since = min(r["at"] for r in report["ranks"] if r["rank"] in report["suspects"])
    latency = report["declared_at"] - hung_since
    return {"figure": "hang detection latency ÷ timeout", "ratio": latency / args.hang_timeout,
            "goal": f"<= {GOALS['hang']}", "detail": f"{latency:.2f}s for a {args.hang_timeout:g}s timeout; exit "
            f"{result.returncode}; suspects {report['suspects']}; stacks in {folder.name}"}


def measure_health(args: argparse.Namespace) -> dict:
    from benchmarks.health import health_check_seconds

    seconds = health_check_seconds(nproc_per_node=2, repeats=args.health_repeats, config=MAIN_JOB)
    median = statistics.median(seconds)
    return {"figure": "health check wall time, 2 ranks (s)", "ratio": median, "goal": f"<= {GOALS['health_s']:g}",
            "detail": "runs: " + ", ".join(f"{s:.1f}s" for s in seconds)}


def measure_rollback(args: argparse.Namespace, workdir: str) -> dict:
    batch = 16  # the main job's global batch: step s reads samples [16 (s-1), 16 s)
    result = _launch(workdir, args.cache, f"nan:samples={4 * batch}-{7 * batch}", "--name=rollback",
                     "--train.max_steps=10", "--checkpoint.every=4", "--resilience.max_bad_steps=3")
    lines = [json.loads(line) for line in (Path(workdir) / "rollback" / "metrics.jsonl").read_text().splitlines()]
    rollback = next(r for r in lines if r.get("event") == "rollback")
    saved = next(r for r in lines if r.get("step") == rollback["to_step"] and "loss" in r)
    lost_s = rollback["time"] - saved["time"]
    return {"figure": "rollback: steps redone", "ratio": rollback["lost_steps"], "goal": "report",
            "detail": f"{lost_s:.2f}s from step {rollback['to_step']} to the rollback at step {rollback['step']}; "
                      f"skipped samples {rollback['skipped_samples']}; exit {result.returncode}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--blocks", type=int, default=6, help="on/off pairs; the first pair is warm-up")
    parser.add_argument("--block-steps", type=int, default=8)
    parser.add_argument("--hang-timeout", type=float, default=10.0)
    parser.add_argument("--health-repeats", type=int, default=3)
    parser.add_argument("--cache", default=str(Path("runs/.cache").resolve()))
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="resilience-") as workdir:
        rows.append(measure_guards(args, workdir))
        rows.append(measure_hang(args, workdir))
        rows.append(measure_health(args))
        rows.append(measure_rollback(args, workdir))
    report("resilience", "resilience (configs/gpt2-tiny.yaml, 2 ranks, fp32)", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
