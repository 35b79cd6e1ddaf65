"""Ray launcher logic that needs no cluster: resume choice, upload size, cluster fit, W&B backfill, the stop
channel (driver signals and Ray's drain notices -> the run's stop file) and what `launch ray` submits."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.core.errors import ConfigError, UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.preemption import StopSignals
from launcher.ray.job import check_cluster_fits, check_output_dir
from launcher.ray.stop import (
    JOB_CONFIG_ENV,
    STOP_WAIT_ENV,
    DrainWatcher,
    DriverStop,
    job_stop_wait_s,
    new_stop_file,
    stop_reason,
)
from launcher.ray.submit import check_upload_size, finished_job_exit_code, submit_command, upload_size
from launcher.ray.worker import BACKFILL_KEY, resume_choice
from tests.conftest import REPO
from tests.helpers.waiting import wait_until


def _committed(run_dir: Path, step: int) -> Path:
    """A step directory with readable metadata (what `newest_committed` looks for)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "bigmodel_meta.json").write_text(json.dumps({"format_version": 1, "step": step, "files": {}}))
    return path


def test_resume_choice_prefers_the_newest_and_respects_an_explicit_choice(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    step4 = _committed(run_dir.path, 4)
    assert resume_choice(None, run_dir, "latest") == "latest"  # Ray knows nothing: the run dir decides
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "latest") == "latest"
    _committed(run_dir.path, 8)  # saved, but the crash came before Ray registered it
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "latest") == "latest"
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, "none") == "none"
    assert resume_choice({"step": 4, "path": str(step4)}, run_dir, str(step4)) == str(step4)
    # a run dir without checkpoints (e.g. a new output_dir) but Ray's record points at a real one
    assert resume_choice({"step": 4, "path": str(step4)}, RunDir(tmp_path / "elsewhere"), "latest") == str(step4)


def test_upload_size_applies_rayignore_and_refuses_over_the_limit(tmp_path):
    (tmp_path / ".rayignore").write_text("runs/\n*.bin\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "ckpt.pt").write_bytes(b"0" * 1000)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "shard.bin").write_bytes(b"0" * 1000)
    total, _ = upload_size(tmp_path)
    assert total == len("x = 1\n") + len("runs/\n*.bin\n")
    with open(tmp_path / "big.txt", "wb") as f:  # sparse: counts by size, costs no disk
        f.truncate(101 * 2**20)
    with pytest.raises(UserInputError, match=r"101 MiB to upload, over Ray's 100 MiB limit \(largest: big.txt"):
        check_upload_size(tmp_path)


def test_repository_upload_is_small():
    total, largest = upload_size(REPO)
    assert total < 5 * 2**20, largest  # .rayignore keeps .venv, runs, data and caches out


def test_cluster_fit_and_output_dir_errors_name_the_field():
    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml", ["--ray.num_workers=4", "--ray.use_gpu=true",
                                                            "--output_dir=/abs/runs"])
    check_output_dir(cfg)
    check_cluster_fits(cfg, {"CPU": 64, "GPU": 4})
    with pytest.raises(UserInputError, match=r"ray.num_workers: 4 workers x 1 GPU need 4 GPU, the Ray cluster has 2"):
        check_cluster_fits(cfg, {"CPU": 64, "GPU": 2})

def test_relative_outputs_refused_only_inside_rays_copy_of_the_working_dir(tmp_path):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (copy / "configs").mkdir(parents=True)
    inside = load_config(REPO / "configs" / "gpt2-tiny.yaml", ["--data.paths=[corpus]"], base_dir=copy / "configs")
    assert inside.output_dir == str(copy / "configs" / "runs") and inside.data.paths == [str(copy / "configs" / "corpus")]
    with pytest.raises(UserInputError, match=r"config field output_dir: .*/_ray_pkg_abc/configs/runs is inside "
                                             r"Ray's temporary copy of the working dir"):
        check_output_dir(inside, cwd=copy / "configs")
    # Inputs in the copy are fine (every worker gets one); so is a relative run dir outside a Ray job.
    check_output_dir(load_config(REPO / "configs" / "gpt2-tiny.yaml", ["--data.paths=[corpus]",
                                                                      "--output_dir=/shared/runs"], base_dir=copy),
                     cwd=copy)
    check_output_dir(load_config(REPO / "configs" / "gpt2-tiny.yaml", base_dir=tmp_path), cwd=tmp_path)


def test_controller_logs_backfilled_steps_once(tmp_path, monkeypatch):
    from launcher.ray import wandb_logging as ray_wandb

    logged: list[tuple[int, dict]] = []

    class FakeRun:  # the W&B run object; the callback's bookkeeping is what is under test
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append((-1, {}))

    monkeypatch.setattr(ray_wandb, "start_wandb", lambda *args: FakeRun())
    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml")
    callback = ray_wandb.WandbOnController(RunDir(tmp_path), cfg.logging, {}, "abc", already_logged_step=0)
    callback.after_report(None, [{"step": 1, "loss": 6.0}, {"step": 1, "loss": 6.0}])
    callback.after_report(None, [{"step": 2, "loss": 5.9}, {}])
    # a worker died with steps 3-4 in flight; the restart resumes at 4 and re-sends 1-4 once
    backfill = [{"step": s, "loss": 6.0 - s / 10} for s in (1, 2, 3, 4)] + [{"step": 4, "checkpoint/save_s": 0.1}]
    callback.after_report(None, [{"step": 5, "loss": 5.5, BACKFILL_KEY: backfill}, {}])
    callback.after_report(None, [{"step": 5, "loss": 5.5}, {}])  # nothing new
    callback.after_controller_finish(None)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 4, 5, -1]
    assert logged[4][1] == {"checkpoint/save_s": 0.1}
    assert os.listdir(tmp_path) == []  # the callback itself writes nothing; W&B does


def test_driver_signals_reach_the_stop_file_that_workers_poll(tmp_path):
    """A signal before the run dir is known is kept and written once the file is named; the workers'
    own StopSignals (no signals in Ray's thread, only the file) then see it."""
    before = signal.getsignal(signal.SIGTERM)
    stop = DriverStop()
    try:
        stop.watch(["SIGTERM", "SIGUSR1"])
        assert {"SIGINT", "SIGTERM", "SIGUSR1"} <= set(stop.signals.watched)  # SIGINT: RAY_JOB_STOP_SIGNAL
        os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends; handled before kill returns
        assert stop.received == "SIGTERM"
        stop_file = new_stop_file(RunDir(tmp_path / "run"))
        assert stop_file.parent == tmp_path / "run" / "ray" and not stop_file.exists()
        assert new_stop_file(RunDir(tmp_path / "run")) != stop_file  # one per driver
        worker_view = StopSignals([], stop_file=str(stop_file))
        assert worker_view.received is None
        stop.attach(stop_file)
        assert worker_view.received == "stop file"
        assert stop_reason(stop_file) == "SIGTERM to the Ray job's driver (ray job stop)"
        os.kill(os.getpid(), signal.SIGINT)  # a second stop keeps the first reason
        assert stop_reason(stop_file) == "SIGTERM to the Ray job's driver (ray job stop)"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) == before  # the process's own handler is back
    assert stop_reason(None) is None and stop_reason(tmp_path / "absent") is None


def test_ray_drain_notice_becomes_a_stop_request(tmp_path):
    stop_file = tmp_path / "stop"
    notices: list[object] = [None, None]  # no drain for two polls, then Ray's PreemptionInfo
    deadline_ms = (time.time() + 90) * 1000

    def read_notice():
        return notices.pop(0) if notices else SimpleNamespace(preempted_node_ids=["ab12"], deadline_ms=deadline_ms)

    watcher = DrainWatcher(stop_file, read_notice, poll_s=0.01).start()
    wait_until(stop_file.exists, "the drain notice's stop request", interval=0.01)
    watcher.close()
    assert not notices
    assert stop_reason(stop_file).startswith("Ray drains node(s) ['ab12'] (preemption), ")
    # outside a Ray Train worker (or with a Ray that has no notices) nothing is watched
    quiet = DrainWatcher(tmp_path / "never").start()
    quiet.close()
    assert not (tmp_path / "never").exists()


def test_stop_wait_comes_from_ray_and_launch_ray_sets_it_and_reports_a_stop_as_requeue(tmp_path):
    assert job_stop_wait_s({}) is None  # not a `ray job submit` entrypoint: nobody kills the driver
    assert job_stop_wait_s({JOB_CONFIG_ENV: "{}"}) == 3  # Ray's default
    assert job_stop_wait_s({JOB_CONFIG_ENV: "{}", STOP_WAIT_ENV: "300"}) == 300
    cfg = load_config(REPO / "configs" / "gpt2-tiny.yaml")
    assert cfg.ray.stop_wait_s == 300
    args = argparse.Namespace(address="http://127.0.0.1:8265", working_dir=tmp_path, no_wait=False, submission_id="s1")
    command = submit_command(args, "configs/gpt2-tiny.yaml", [], cfg.ray.stop_wait_s)
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {STOP_WAIT_ENV: "300"}}
    assert command[command.index("--submission-id") + 1] == "s1"
    # `ray job submit` says 0 for a stopped job and 1 for any failure; Ray's record of the job says more
    assert finished_job_exit_code(0, {"status": "STOPPED", "driver_exit_code": None}, 85) == 85
    assert finished_job_exit_code(1, {"status": "FAILED", "driver_exit_code": 85}, 85) == 85  # a drained node
    assert finished_job_exit_code(1, {"status": "FAILED", "driver_exit_code": 1}, 85) == 1
    assert finished_job_exit_code(0, {"status": "SUCCEEDED", "driver_exit_code": 0}, 85) == 0
    assert finished_job_exit_code(1, None, 85) == 1  # the dashboard did not answer: what submit said
    with pytest.raises(ConfigError, match="ray.stop_wait_s"):
        load_config(REPO / "configs" / "gpt2-tiny.yaml", ["--ray.stop_wait_s=0"])


def test_elastic_sizes_keep_the_global_batch_and_fit_node_by_node():
    from launcher.ray.elastic import best_size, placeable_workers, worker_counts

    cfg = load_config(None, ["--train.global_batch_size=8", "--train.micro_batch_size=1", "--ray.num_workers=1..6"])
    assert worker_counts(cfg) == [1, 2, 4]  # 3, 5 and 6 would change the global batch
    per_worker = {"CPU": 1.0, "slot": 1.0}
    free = {"a": {"CPU": 3.0, "slot": 1.0}, "b": {"CPU": 0.5, "slot": 2.0}, "c": {"CPU": 2.0, "slot": 2.0}}
    assert placeable_workers(free, per_worker) == 3  # a: 1 (slot), b: 0 (CPU), c: 2; never across nodes
    assert best_size([1, 2, 4], 3) == 2 and best_size([2, 4], 1) is None
    with pytest.raises(UserInputError, match="ray.num_workers"):
        worker_counts(load_config(None, ["--train.global_batch_size=8", "--train.micro_batch_size=1",
                                               "--ray.num_workers=5..7"]))  # no size divides 8


def test_the_grow_watcher_asks_for_a_stop_only_once_its_group_is_placed_and_a_larger_size_fits(tmp_path):
    from launcher.ray.elastic import GrowWatcher

    stop_file = tmp_path / "stop"
    free = {"n1": {"CPU": 1.0}}  # room for one more worker: 2 + 1 = 3 does not keep the batch, 2 + 2 = 4 does
    placed = {"yes": False}
    watcher = GrowWatcher(2, [1, 2, 4], {"CPU": 1.0}, stop_file, not_before=0.0, placed=lambda: placed["yes"],
                          read_free=lambda: free, poll_s=0.01).start()
    try:
        free["n2"] = {"CPU": 1.0}  # now 2 more fit, but the group is not placed yet: its own may look free
        time.sleep(0.2)
        assert not stop_file.exists()
        placed["yes"] = True
        wait_until(stop_file.exists, "the grow's stop request", interval=0.01, guard=30)  # it polls every 10 ms
    finally:
        watcher.close()
    assert stop_reason(stop_file) == "grow from 2 to 4 workers" and watcher.target == 4


def test_an_elastic_driver_that_cannot_place_its_minimum_gives_up_after_its_wait():
    from launcher.ray.elastic import wait_for_size

    assert wait_for_size([2, 4], {"CPU": 1.0}, wait_s=0.05, stopped=lambda: False,
                         read_free=lambda: {"n1": {"CPU": 1.0}}, poll_s=0.01) is None
    assert wait_for_size([2, 4], {"CPU": 1.0}, wait_s=0.05, stopped=lambda: False,
                         read_free=lambda: {"n1": {"CPU": 3.0}}, poll_s=0.01) == 2
