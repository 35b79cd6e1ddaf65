"""What slurm/prepare.sh runs: plan and submit; one array task's chunk of shards; finalize.

`sbatch [options] slurm/prepare.sh CONFIG [overrides]` starts the first job, which runs
`python -m launcher.slurm.prepare --script SCRIPT CONFIG [overrides]`: it plans every prepared folder of
the config (trains or loads the tokenizer once, saves it into each folder, counts the shards), writes the
plans file `<cache_dir>/prepare-slurm/<job id>/plans.json` (the plans, the shards still to write and the
number of tasks) and submits two jobs of the same script, with the same partition, account, QOS, CPUs
and memory:
  - a job array, one task per chunk of the incomplete shards (`--write-shards PLANS`); each writes its
    shards, skipping complete ones;
  - a finalize job (`--finalize PLANS`), `--dependency=afterok:<array> --kill-on-invalid-dep=yes`: it
    writes meta.json once every task has succeeded. A failed or cancelled task leaves it cancelled, and
    submitting the same command again writes only the shards still incomplete.
With nothing left to prepare the first job submits nothing. Slurm does all the scheduling.

Tasks: BIGMODEL_PREPARE_TASKS (default: one per incomplete shard, at most MAX_ARRAY_TASKS, under
Slurm's default MaxArraySize). Logs of the array and the finalize job go next to the plans file.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from bigmodel_dist.config import load_config
from bigmodel_dist.core.env import PREPARE_TASKS
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.data.mixture_sources import run_plans
from bigmodel_dist.data.prepare import cache_dir_of
from bigmodel_dist.data.prepare_plan import (
    chunk,
    finalize,
    incomplete_units,
    load_plans,
    save_plans,
    write_units,
)
from bigmodel_dist.run.resolve import resolve_run
from launcher.logs import setup_logging
from launcher.user_errors import report_user_errors

log = logging.getLogger(__name__)
MAX_ARRAY_TASKS = 1000
# What the first job passes on to the jobs it submits: sbatch option <- its environment variable there.
INHERITED = {"--partition": "SLURM_JOB_PARTITION", "--account": "SLURM_JOB_ACCOUNT", "--qos": "SLURM_JOB_QOS",
             "--cpus-per-task": "SLURM_CPUS_PER_TASK", "--mem": "SLURM_MEM_PER_NODE",
             "--mem-per-cpu": "SLURM_MEM_PER_CPU"}


def inherited_options(env: dict[str, str]) -> list[str]:
    return [f"{flag}={env[var]}" for flag, var in INHERITED.items() if env.get(var)]


def num_tasks(num_units: int, env: dict[str, str]) -> int:
    wanted = env.get(PREPARE_TASKS, "")
    if wanted and not (wanted.isdigit() and int(wanted) > 0):
        raise UserInputError(f"{PREPARE_TASKS}={wanted!r}: give a whole number of array tasks > 0")
    return min(num_units, int(wanted) if wanted else MAX_ARRAY_TASKS)


def plan_and_submit(script: Path, config: str, overrides: list[str], env: dict[str, str]) -> int:
    cfg = load_config(config, overrides)
    resolved = resolve_run(cfg, world_size=1)
    plans = run_plans(cfg, resolved.shape.vocab_size)
    if not plans:
        print("prepared data complete: nothing to submit", flush=True)
        return 0
    units = incomplete_units(plans)
    if not units:  # a run killed between its last shard and meta.json
        for plan in plans:
            print(f"every shard complete: finalized {finalize(plan)}", flush=True)
        return 0
    job_id = env.get("SLURM_JOB_ID", str(os.getpid()))
    folder = cache_dir_of(cfg.data, cfg.output_dir).resolve() / "prepare-slurm" / job_id
    tasks = num_tasks(len(units), env)
    save_plans(folder / "plans.json", plans, units, tasks)
    common = ["sbatch", "--parsable", *inherited_options(env)]
    array = _sbatch([*common, f"--array=0-{tasks - 1}", "--job-name=bigmodel-prepare-shards",
                     f"--output={folder / 'task-%A_%a.out'}", str(script), "--write-shards", str(folder / "plans.json")])
    final = _sbatch([*common, f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes",
                     "--job-name=bigmodel-prepare-finalize", f"--output={folder / 'finalize-%j.out'}", str(script),
                     "--finalize", str(folder / "plans.json")])
    print(f"plans {folder / 'plans.json'}: {len(units)} shard(s) of {len(plans)} folder(s) to write in {tasks} "
          f"task(s): array job {array}, finalize job {final} (after every task succeeds)", flush=True)
    return 0


def _sbatch(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserInputError(f"sbatch refused {' '.join(command[2:])}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def write_chunk(plans_file: Path, env: dict[str, str]) -> int:
    plans, units, tasks = load_plans(plans_file)
    task = int(env["SLURM_ARRAY_TASK_ID"])
    os.environ.setdefault("RAYON_NUM_THREADS", env.get("SLURM_CPUS_PER_TASK", "1"))
    mine = chunk(units, tasks, task)
    log.info("task %d of %d: shards %s", task, tasks, ", ".join(f"{plans[p].folder.name}/{s}" for p, s in mine))
    write_units(plans, mine)
    return 0


def finalize_all(plans_file: Path) -> int:
    from bigmodel_dist.data.dataset import PackedDataset

    plans, _, _ = load_plans(plans_file)
    for plan in plans:
        data = PackedDataset(finalize(plan), verify="checksum")
        print(f"{plan.out}: {len(data.train)} train + {len(data.val)} val sequences of {data.seq_len} tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.slurm.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, required=True, help="the sbatch script to submit the next jobs with")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--write-shards", type=Path, metavar="PLANS", help="array task: write this task's chunk")
    step.add_argument("--finalize", type=Path, metavar="PLANS", help="write meta.json of every plan")
    parser.add_argument("config", nargs="?", help="run config (first job only)")
    args, overrides = parser.parse_known_args(argv)
    setup_logging()
    env = dict(os.environ)

    def run() -> int:
        if args.write_shards:
            return write_chunk(args.write_shards, env)
        if args.finalize:
            return finalize_all(args.finalize)
        if not args.config:
            raise UserInputError("no config; usage: sbatch slurm/prepare.sh CONFIG [--section.field=value ...]")
        bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
        if bad:
            raise UserInputError(f"unrecognised argument {bad[0]!r}; overrides look like --section.field=value")
        return plan_and_submit(args.script.resolve(), args.config, overrides, env)

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
