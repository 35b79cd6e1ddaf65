"""Every `BIGMODEL_*` environment variable: its name, who sets it, who reads it, one line of doc. The one
place the names are defined; code reads them through these constants, and the README's table is this
registry as `python -m bigmodel_dist.core.env` prints it (a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    set_by: str  # "you" for a user's knob, else the file that sets it
    read_by: tuple[str, ...]  # the files that read it (a test checks each really names it)
    doc: str


# Set by the launchers for the processes they start.
STOP_FILE = "BIGMODEL_STOP_FILE"
LAUNCH_ID = "BIGMODEL_LAUNCH_ID"
PROGRESS_DIR = "BIGMODEL_PROGRESS_DIR"
SUSPECT_NODES_FILE = "BIGMODEL_SUSPECT_NODES_FILE"
HEALTH_RESULT_FILE = "BIGMODEL_HEALTH_RESULT_FILE"
NPROC_PER_NODE = "BIGMODEL_NPROC_PER_NODE"
# Knobs for users and drills.
SAMPLE_LEDGER = "BIGMODEL_SAMPLE_LEDGER"
FAULTS = "BIGMODEL_FAULTS"
ALLOW_FAULTS = "BIGMODEL_ALLOW_FAULTS"
PREPARE_TASKS = "BIGMODEL_PREPARE_TASKS"

VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(STOP_FILE, "launcher/local/launch.py", ("launcher/cli.py", "launcher/ray/worker.py"),
           "a file the launcher writes to ask its workers to stop (a signal it got, a resize)"),
    EnvVar(LAUNCH_ID, "launcher/local/launch.py, slurm/pretrain_gpt.sh", ("bigmodel_dist/core/distributed.py",
           "launcher/local/launch.py", "launcher/ray/worker.py"),
           "which launch a run's markers belong to; set one shared value for a manual multi-node `launch local`"),
    EnvVar(PROGRESS_DIR, "launcher/local/launch.py", ("bigmodel_dist/ft/progress.py", "launcher/cli.py"),
           "where each rank publishes its step and phase for the node's hang watchdog"),
    EnvVar(SUSPECT_NODES_FILE, "slurm/pretrain_gpt.sh", ("bigmodel_dist/ft/suspects.py", "slurm/pretrain_gpt.sh"),
           "where a hang or a failed health check names the nodes the requeued job must avoid"),
    EnvVar(HEALTH_RESULT_FILE, "launcher/check.py", ("launcher/check.py",),
           "where `bigmodel check`'s local rank 0 writes the node's verdict for its launcher"),
    EnvVar(NPROC_PER_NODE, "you, or `bigmodel launch slurm --nproc-per-node`", ("slurm/pretrain_gpt.sh",),
           "processes per node under Slurm (default: the node's GPUs, else 1)"),
    EnvVar(SAMPLE_LEDGER, "you", ("bigmodel_dist/data/ledger.py", "launcher/ray/submit.py"),
           "a folder where each rank appends the samples it read, per micro-batch (an audit of the data order)"),
    EnvVar(FAULTS, "you (tests and drills)", ("bigmodel_dist/ft/faults.py", "launcher/ray/submit.py"),
           "faults to inject, e.g. `hang:rank=1,step=5;nan:samples=64-112`"),
    EnvVar(ALLOW_FAULTS, "you (tests and drills)", ("bigmodel_dist/ft/faults.py", "launcher/ray/submit.py"),
           "must be 1 for BIGMODEL_FAULTS to be accepted; without it the run refuses to start"),
    EnvVar(PREPARE_TASKS, "you", ("launcher/slurm/prepare.py",),
           "array tasks of `sbatch slurm/prepare.sh` (default: one per incomplete shard, at most 1000)"),
    EnvVar("BIGMODEL_ENV_HOOK", "you", ("slurm/pretrain_gpt.sh", "slurm/prepare.sh", "slurm/ray_cluster.sh"),
           "a shell file the sbatch scripts source first (modules, a virtualenv, a container set-up)"),
    EnvVar("BIGMODEL_SLURM_MODE", "you", ("slurm/pretrain_gpt.sh",),
           "`torchrun` (default: one task per node) or `tasks` (one task per GPU, ranks from Slurm)"),
    EnvVar("BIGMODEL_MAX_REQUEUES", "you", ("slurm/pretrain_gpt.sh",),
           "how often a Slurm job that keeps stopping is requeued (default 20)"),
    EnvVar("BIGMODEL_ELASTIC_MIN_NODES", "you", ("slurm/pretrain_gpt.sh",),
           "elastic Slurm runs (with `sbatch --no-kill`): go on with at least this many nodes after a node fails"),
    EnvVar("BIGMODEL_MAX_RESTARTS", "you", ("slurm/pretrain_gpt.sh",),
           "torchrun restarts of an elastic Slurm run within its allocation (default 3)"),
    EnvVar("BIGMODEL_RAY_JOIN_TIMEOUT_S", "you", ("slurm/ray_cluster.sh",),
           "seconds `slurm/ray_cluster.sh` waits for the allocation's Ray workers to join (default 300)"),
    EnvVar("BIGMODEL_TEST_HANG_GUARD_S", "you (tests)", ("tests/helpers/guards.py",),
           "the test suite's one bound, turning a hang into a failure (default 900 s)"),
    EnvVar("BIGMODEL_SLURM_BASE", "you (tests)", ("tests/cluster/start_slurm.sh", "tests/cluster/stop_slurm.sh",
           "tests/cluster/fixtures.py"), "where the tests' local Slurm cluster lives (default /tmp/bigmodel-slurm)"),
    EnvVar("BIGMODEL_SLURM_READY_TIMEOUT", "you (tests)", ("tests/cluster/start_slurm.sh",),
           "seconds the tests' local Slurm cluster may take to accept jobs (default 90)"),
    EnvVar("BIGMODEL_BENCH_RESULTS", "benchmarks/run_all.py", ("benchmarks/report.py",),
           "where benchmarks write their results (`run_all --quick` moves them aside)"),
)


def table() -> str:
    """The README's table of environment variables."""
    rows = ["| variable | set by | read by | what it does |", "| --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.set_by} | {', '.join(f'`{f}`' for f in v.read_by)} | {v.doc} |" for v in VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
