"""Ray: `ray job submit` of the shared trainer to a real local Ray cluster (loopback only).

One uninterrupted ZeRO-2 run (by `bigmodel launch ray`) is the reference for the interrupted ones: a
ZeRO-3 job with a worker killed mid-run (by plain `ray job submit` from a repo copy full of data and
checkpoints), and a ZeRO-2 job (by `bigmodel launch ray`) stopped with `ray job stop` between two periodic
checkpoints, then resubmitted under the same run name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel_dist.checkpoint.integrity import DS_TAG
from bigmodel_dist.metrics.jsonl import read_metrics
from tests.cluster.ray_cluster import job_env, listening_sockets, netns_prefix, worker_pids
from tests.conftest import TINY
from tests.helpers.commands import assert_one_line_error, cli_command, run_cli, run_command
from tests.helpers.guards import HANG_GUARD_S
from tests.helpers.launching import Launch
from tests.helpers.waiting import wait_until
from tests.journeys.fresh_clone import copy_repository

pytestmark = pytest.mark.distributed

STEPS, EVERY = 10, 4
JUNK_MIB = 60  # per junk file: data + checkpoints in the repo copy add up to more than Ray's 100 MiB limit


def _overrides(out: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    base = [o for o in TINY if not o.startswith("--logging.wandb_mode")]
    return [*base, f"--output_dir={out}", f"--data.cache_dir={data_cache}", f"--name={name}",
            "--train.precision=fp32", f"--train.max_steps={STEPS}", f"--checkpoint.every={EVERY}",
            "--logging.wandb_mode=offline", *extra]


def _submit_command(cluster, workdir: Path, overrides: list[str], *flags: str) -> list[str]:
    return ["ray", "job", "submit", "--address", cluster.address, "--working-dir", str(workdir), *flags, "--",
            "python", "-m", "launcher.ray_job", "configs/gpt2-tiny.yaml", *overrides]


def _submit(cluster, workdir: Path, overrides: list[str], *flags: str) -> subprocess.CompletedProcess:
    return cluster.run(_submit_command(cluster, workdir, overrides, *flags), env=job_env(), timeout=HANG_GUARD_S)


def _submit_in_background(cluster, workdir: Path, overrides: list[str], *flags: str) -> Launch:
    return Launch([*netns_prefix(), *_submit_command(cluster, workdir, overrides, *flags)], job_env())


def _losses(run_dir: Path) -> list[float]:
    steps, losses = read_metrics(run_dir / "metrics.jsonl").series("loss")
    assert steps == list(range(1, STEPS + 1))
    return losses


def _wandb_file(run_dir: Path) -> bytes:
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # one W&B process (on Ray's controller), however often workers restart
    return runs[0].read_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of the repository holding data, checkpoints and a virtualenv that must not be uploaded."""
    dest = copy_repository(tmp_path_factory.mktemp("repo"))
    for junk in ("data/corpus.bin", "runs/old-run/checkpoints/step_00000001/model.pt", ".venv/lib/big.so"):
        (dest / junk).parent.mkdir(parents=True, exist_ok=True)
        (dest / junk).write_bytes(os.urandom(JUNK_MIB * 2**20))  # random: Ray's zip cannot shrink it
    return dest


@pytest.fixture(scope="module")
def reference_runs(ray_cluster, workdir, tmp_path_factory, data_cache) -> dict:
    """The uninterrupted ZeRO-2 run, submitted by `bigmodel launch ray` (its checks, then `ray job submit`)."""
    out = tmp_path_factory.mktemp("ray-runs")
    launch = ["launch", "ray", "configs/gpt2-tiny.yaml", "--address", ray_cluster.address,
              *_overrides(out, data_cache, "zero2", "--deepspeed.config=zero2")]
    return {"out": out, "zero2": run_cli(launch, cwd=workdir, env=job_env(), prefix=netns_prefix())}


def _check_finished_run(run_dir: Path, stage: int, kept: tuple[int, ...] = (4, 8, 10)) -> None:
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == STEPS
    steps = [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))]
    assert steps == [f"step_{step:08d}" for step in kept]
    final = run_dir / "checkpoints" / "step_00000010"
    assert json.loads((final / "bigmodel_meta.json").read_text())["zero_stage"] == stage
    assert len(list((final / DS_TAG).glob("*zero_pp_rank_*optim_states.pt"))) == 2  # both ranks
    # Ray's own record of the run: manifests pointing at our step directories, kept to keep_last
    assert (run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json").is_file()
    manifests = sorted(p.name for p in (run_dir / "ray" / run_dir.name).glob("manifest_*"))
    assert manifests == [f"manifest_step_{step:08d}" for step in kept]


def _sent_mib(logs: str) -> float:
    """What the job's driver found in its working dir (Ray's copy of what was uploaded)."""
    sent = [line for line in logs.splitlines() if "working dir" in line and " files, " in line]
    assert sent, logs[-3000:]
    return float(sent[0].split(" files, ")[1].split(" MiB")[0])


def test_ray_job_succeeds_with_checkpoints_w_and_b_and_a_small_upload(reference_runs):
    """ZeRO-2 here; ZeRO-3 is the killed worker's job. Every socket of the cluster on loopback."""
    job = reference_runs["zero2"]
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    # the node health check ran in the worker group before training, and passed
    assert re.search(r"health check: .*healthy", job.stdout + job.stderr), job.stdout[-6000:]
    run_dir = reference_runs["out"] / "zero2"
    _check_finished_run(run_dir, stage=2)
    wandb_bytes = _wandb_file(run_dir)  # W&B from Ray's controller: every step's loss
    assert all(json.dumps(v).encode() in wandb_bytes for v in _losses(run_dir))
    # the repo copy holds 3 x 60 MiB of data, checkpoints and virtualenv; the job saw none of it
    assert "uploading" in job.stderr and _sent_mib(job.stdout + job.stderr) < 5
    assert all(addr.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") == "127.0.0.1"
               for addr in listening_sockets()), listening_sockets()


def test_killed_worker_restarts_from_the_last_checkpoint_with_the_same_losses(reference_runs, ray_cluster, workdir,
                                                                             data_cache):
    out = reference_runs["out"]
    job = _submit_in_background(ray_cluster, workdir, _overrides(out, data_cache, "killed", "--deepspeed.config=zero3"))
    wait_until((out / "killed" / "checkpoints" / f"step_{EVERY:08d}").exists, f"the step-{EVERY} checkpoint",
               alive=[job])
    victims = worker_pids(ray_cluster.head_pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    code = job.finish()
    output = job.output
    assert code == 0, output[-6000:]
    assert _sent_mib(output) < 5  # plain `ray job submit --working-dir` of the repo copy: .rayignore works

    history = read_metrics(out / "killed" / "metrics.jsonl")
    assert [r["step"] for r in history.restarts] in ([EVERY], [2 * EVERY])  # resumed from a checkpoint
    # the uninterrupted ZeRO-2 run: fp32 ZeRO stages agree to ~5e-7 (tests/distributed/test_zero_stages.py)
    reference = _losses(out / "zero2")
    losses = _losses(out / "killed")
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 1e-4
    # nothing logged before the kill is lost in W&B: the controller, not the killed rank, logged it
    raw = [json.loads(line) for line in (out / "killed" / "metrics.jsonl").read_text().splitlines()]
    first_logged = {}
    for record in raw:
        if "loss" in record:
            first_logged.setdefault(record["step"], record["loss"])
    wandb_bytes = _wandb_file(out / "killed")
    assert all(json.dumps(v).encode() in wandb_bytes for v in first_logged.values())


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def test_ray_job_stop_mid_interval_saves_that_step_and_the_resubmission_resumes_it_exactly(
        reference_runs, ray_cluster, workdir, data_cache):
    """`ray job stop` between two periodic checkpoints (4 and 8): the driver passes it on through the run's
    stop file, the workers save the step they are in and stop, the driver exits with the requeue code, and
    nothing is lost: the resubmission resumes from that step with the uninterrupted run's losses.

    The workers are paused (SIGSTOP) from step 5's log line until the driver has written the stop file,
    so the stop lands in step 6 however fast the machine is."""
    out, stop_step = reference_runs["out"], EVERY + 2
    run_dir = out / "stopped"
    overrides = _overrides(out, data_cache, "stopped", "--deepspeed.config=zero2")
    launch = ["launch", "ray", "configs/gpt2-tiny.yaml", "--address", ray_cluster.address,
              "--submission-id", "bigmodel-stop-1", *overrides]  # sets ray.stop_wait_s (300 s) for the job
    job = Launch([*netns_prefix(), *cli_command(launch)], job_env(), cwd=workdir)
    wait_until(lambda: read_metrics(run_dir / "metrics.jsonl").last_step() >= EVERY + 1, "step 5 logged", alive=[job])
    workers = worker_pids(ray_cluster.head_pid)
    assert len(workers) == 2
    _signal_all(workers, signal.SIGSTOP)
    try:
        stop = ray_cluster.run(["ray", "job", "stop", "--no-wait", "--address", ray_cluster.address,
                                "bigmodel-stop-1"], env=job_env(), timeout=HANG_GUARD_S)  # it would wait for the end
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_until(lambda: any((run_dir / "ray").glob("stop-*")), "stop file from the driver", alive=[job])
    finally:
        _signal_all(workers, signal.SIGCONT)
    code = job.finish()
    output = job.output
    assert code == 85, output[-6000:]  # `launch ray` passes on the requeue code of a stopped job
    assert "SIGTERM: asked the workers to stop after their current step and save" in output, output[-6000:]
    assert "Ray kills the job 300 s after its signal" in output
    assert (f"stopped at step {stop_step} with its checkpoint (SIGTERM to the Ray job's driver (ray job stop)), "
            in output), output[-6000:]
    assert " s after the signal; exit 85 asks to requeue" in output
    status = ray_cluster.run(["ray", "job", "status", "--address", ray_cluster.address, "bigmodel-stop-1"],
                             env=job_env(), timeout=HANG_GUARD_S)
    assert "was stopped" in status.stdout + status.stderr
    marker = json.loads((run_dir / "STOPPED").read_text())
    assert (marker["step"], marker["stop_reason"]) == (stop_step, "signal")
    assert not (run_dir / "COMPLETED").exists() and not list((run_dir / "ray").glob("stop-*"))  # cleaned up
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stop_step:08d}"
    assert read_metrics(run_dir / "metrics.jsonl").last_step() == stop_step  # steps lost by the stop: 0

    again = _submit(ray_cluster, workdir, overrides)  # same run name, new submission
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"Ray checkpoint step {stop_step}" in again.stdout + again.stderr  # Ray registered the stop checkpoint
    _check_finished_run(run_dir, stage=2, kept=(stop_step, 2 * EVERY, STEPS))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl").restarts] == [stop_step]
    assert _losses(run_dir) == _losses(out / "zero2")  # bit-exact


def test_bad_ray_inputs_fail_fast_with_one_line(ray_cluster, workdir, tmp_path, data_cache):
    overrides = _overrides(tmp_path, data_cache, "bad")
    # more workers than the cluster's 6 CPUs: refused by the job's driver before any worker starts
    job = _submit(ray_cluster, workdir, [*overrides, "--ray.num_workers=8", "--train.global_batch_size=16"])
    assert job.returncode != 0
    assert "ray.num_workers: 8 workers x 1 CPU need 8 CPU, the Ray cluster has 6" in job.stdout + job.stderr
    assert "[rank " not in job.stdout + job.stderr  # refused by the driver: no worker ever started

    launch = ["launch", "ray", "configs/gpt2-tiny.yaml", *overrides]
    # no cluster at the address
    nobody = run_cli([*launch, "--address", "http://127.0.0.1:9"], cwd=workdir, env=job_env())
    assert_one_line_error(nobody, "no Ray cluster answers at http://127.0.0.1:9")
    # a working dir over Ray's upload limit (a big file no ignore file names)
    big = tmp_path / "big-repo"
    shutil.copytree(workdir / "configs", big / "configs")
    (big / "corpus.txt").write_bytes(os.urandom(101 * 2**20))
    over = run_cli([*launch, "--working-dir", str(big)], cwd=big, env=job_env())
    assert_one_line_error(over, "over Ray's 100 MiB limit (largest: corpus.txt")
    # (a relative output_dir inside Ray's copy of the working dir: tests/cluster/test_ray_readme.py)
    ray_job = [sys.executable, "-m", "launcher.ray_job", "configs/gpt2-tiny.yaml"]
    # a cluster address where nobody listens: an error, not a hang
    unreachable = run_command([*ray_job, f"--output_dir={tmp_path}", "--ray.address=127.0.0.1:1"], cwd=workdir,
                              env=job_env())
    assert_one_line_error(unreachable, "no Ray cluster at 127.0.0.1:1", after_logs=True)
