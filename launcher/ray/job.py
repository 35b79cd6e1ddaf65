"""The Ray entry point: `ray job submit --working-dir . -- python -m launcher.ray_job CONFIG [overrides]`.

Runs on the cluster (the job's driver): checks the config and the cluster before any worker starts,
prepares the data once, then runs Ray Train's TorchTrainer whose workers run the shared trainer
(`launcher/ray/worker.py`). Restarts after worker failures come from FailureConfig; resubmitting the
same run name resumes (Ray's run folder and our checkpoints both live in the run directory).

`ray job stop` signals this driver: it asks the workers to stop through the run's stop file
(`launcher/ray/stop.py`), waits for their one checkpoint and exits with `checkpoint.requeue_exit_code`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bigmodel_dist.config import load_config
from bigmodel_dist.config.loader import to_dict
from bigmodel_dist.config.paths import output_paths
from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import EXIT_USAGE, UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.ft.resize import GROW_PREFIX
from bigmodel_dist.run.precision import DeviceInfo
from bigmodel_dist.run.resolve import ResolvedRun, resolve_run
from launcher.flow import LaunchEnd, Markers, exit_code
from launcher.logs import setup_logging
from launcher.preflight import check_previous_run, prepare_for
from launcher.ray.elastic import (
    GrowWatcher,
    wait_for_size,
    worker_counts,
    worker_resources,
    written_since,
)
from launcher.ray.stop import DriverStop, job_stop_wait_s, new_stop_file, stop_reason
from launcher.user_errors import report_user_errors

log = logging.getLogger(__name__)
USAGE = "usage: python -m launcher.ray_job CONFIG [--section.field=value ...]"
CONNECT_THREAD = "ray-connect"  # ray.init runs in it, under our own deadline
FIT_THREAD = "ray-train-fit"  # trainer.fit() runs in it, so that the main thread takes the stop signals
FIT_JOIN_S = 0.5  # how often the main thread looks up from waiting for fit() to log a stop it heard


def storage_path(cfg: Config, run_dir: RunDir) -> str:
    """Ray's storage_path: its run folder (storage_path/name) goes inside our run directory by default."""
    return cfg.ray.storage_path or str(run_dir.ray_storage)


RAY_WORKING_DIR_COPIES = "runtime_resources/working_dir_files"  # where Ray unpacks `--working-dir`


def ray_working_dir_copy(cwd: Path) -> Path | None:
    """The root of Ray's temporary copy of the submitted folder when `cwd` lies in one, else None."""
    parts = cwd.parts
    marker = tuple(RAY_WORKING_DIR_COPIES.split("/"))
    for i in range(len(parts) - len(marker)):
        if parts[i : i + len(marker)] == marker:
            return Path(*parts[: i + len(marker) + 1])
    return None


def check_output_dir(cfg: Config, cwd: Path | None = None) -> None:
    """Relative paths mean "relative to where the command ran"; under `ray job submit --working-dir` that
    is Ray's temporary copy of the submitted folder. Inputs there are fine (Ray unpacks the same copy for
    every worker), but a folder the run writes would vanish with the job and other nodes would not see it."""
    copy = ray_working_dir_copy(cwd or Path.cwd())
    if copy is None:
        return
    for field, value in output_paths(cfg).items():
        if Path(value).is_relative_to(copy):
            raise UserInputError(f"config field {field}: {value} is inside Ray's temporary copy of the working dir "
                                 f"({copy}), which Ray deletes after the job and other nodes do not see; give an "
                                 f"absolute path on storage every node sees, e.g. --{field}=/shared/runs")


def ray_workers_device(cfg: Config) -> DeviceInfo:
    """The workers' device as the config describes it: the driver may run where they do not (a CPU head).
    Each worker decides `precision: auto` again on its own device."""
    if cfg.ray.use_gpu:
        return DeviceInfo.gpu_target()
    return DeviceInfo(has_cuda=False, native_bf16=False, name="Ray CPU workers")


def required_resources(cfg: Config) -> dict[str, float]:
    """What the smallest allowed worker group needs (all of `ray.num_workers` when it is a number)."""
    workers = min(worker_counts(cfg))
    return {name: workers * amount for name, amount in worker_resources(cfg).items()}


def check_cluster_fits(cfg: Config, available: dict[str, float]) -> None:
    """Ray would wait forever for workers it cannot place: refuse with the numbers instead."""
    workers = min(worker_counts(cfg))
    for resource, amount in required_resources(cfg).items():
        have = available.get(resource, 0.0)
        if amount > have:
            per_worker = worker_resources(cfg)[resource]
            field = {"GPU": "ray.gpus_per_worker", "CPU": "ray.cpus_per_worker"}.get(
                resource, f"ray.resources_per_worker.{resource}")
            raise UserInputError(
                f"config field ray.num_workers: {workers} workers x {per_worker:g} {resource} need "
                f"{amount:g} {resource}, the Ray cluster has {have:g}; lower ray.num_workers (or {field}) or add "
                "nodes")


def connect(cfg: Config) -> None:
    """Join the cluster or fail with one line; never wait without a limit."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "auto"
    host_port = address.split("://", 1)[-1]
    if address != "auto" and ":" in host_port and not address.startswith("http"):
        host, port = host_port.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=cfg.ray.connect_timeout_s).close()
        except (OSError, ValueError) as exc:
            raise UserInputError(f"no Ray cluster at {address} ({exc}); start one (ray start --head) or set "
                                 "ray.address / RAY_ADDRESS to its GCS address host:6379") from None
    # ray.init retries a silent or wrong address for minutes: give it a deadline of our own.
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(address=address, log_to_driver=True)
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread below
            outcome.append(exc)

    worker = threading.Thread(target=join, name=CONNECT_THREAD, daemon=True)
    worker.start()
    worker.join(cfg.ray.connect_timeout_s)
    if not outcome:  # the thread keeps retrying: main() then exits without waiting for it
        raise UserInputError(f"no Ray cluster answered at {address!r} within ray.connect_timeout_s="
                             f"{cfg.ray.connect_timeout_s:g}s; check the cluster (ray status) or set ray.address")
    if outcome[0] is not None:
        failure = outcome[0]
        first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise UserInputError(f"no Ray cluster reachable at {address!r} ({first}); submit with `ray job submit` "
                             "to a running cluster or set ray.address") from None


# Ray Train's own node-drain watcher (an actor per worker group) duplicates launcher/ray/stop.py's, which
# drives the project's stop-and-save, and its start logs an error line on every run (its constructor
# arguments with max_restarts=-1, ray-project/ray#53727). Ray passes this variable on to its controller.
RAY_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def build_trainer(resolved: ResolvedRun, stop_file: Path, num_workers: int, max_failures: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(RAY_PREEMPTION_WATCHER_ENV, "0")

    from bigmodel_dist.metrics.jsonl import read_metrics
    from bigmodel_dist.metrics.logger import wandb_run_id
    from launcher.ray.wandb_logging import WandbOnController
    from launcher.ray.worker import train_worker

    cfg, run_dir = resolved.config, resolved.run_dir
    resources = worker_resources(cfg)
    callbacks: list[Any] = []  # ray.tune.Callback
    if cfg.logging.wandb_mode != "disabled":
        callbacks.append(WandbOnController(run_dir, cfg.logging, to_dict(cfg), wandb_run_id(run_dir),
                                           read_metrics(run_dir.metrics).last_step()))
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "stop_file": str(stop_file)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg, run_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep or cfg.checkpoint.keep_last),
            callbacks=callbacks,
        ),
    )


def run(config_path: str, overrides: list[str], stop: DriverStop) -> int:
    cfg = load_config(config_path, overrides)
    stop.watch(cfg.checkpoint.stop_signals)
    check_output_dir(cfg)
    resolved = resolve_run(cfg, max(worker_counts(cfg)), ray_workers_device(cfg))
    _log_working_dir()
    connect(cfg)
    stop.reclaim()  # from Ray's SIGTERM handler, which would abort this driver mid-stop
    import ray

    check_cluster_fits(cfg, ray.cluster_resources())
    resolved, finished = check_previous_run(resolved)  # another model or corpus: one line, before any worker
    if finished:
        log.info(finished)
        return 0
    prepare_for(resolved)  # once, here: a progress bar in the job log and input errors before any worker
    if cfg.ray.elastic:
        return _train_elastic(resolved, stop)
    stop_file = new_stop_file(resolved.run_dir)
    try:
        return _train(resolved, stop, stop_file, cfg.ray.worker_range()[0], cfg.ray.max_failures)
    finally:
        stop_file.unlink(missing_ok=True)


def _train_elastic(resolved: ResolvedRun, stop: DriverStop) -> int:
    """Attempts sized by the driver (launcher/ray/elastic.py): smaller after a lost worker, larger at a
    checkpoint when the cluster can place more. Failures count against ray.max_failures here, since
    Ray's own retry would wait for the lost worker's resources at the old size."""
    cfg = resolved.config
    sizes, per_worker = worker_counts(cfg), worker_resources(cfg)
    low, high = cfg.ray.worker_range()
    log.info("elastic: %d..%d workers; sizes that keep the global batch %d: %s; grow at most every %.0f s",
             low, high, cfg.train.global_batch_size, sizes, cfg.ray.grow_every_s)
    failures, grow_after = 0, time.monotonic() + cfg.ray.grow_every_s
    while True:
        size = wait_for_size(sizes, per_worker, cfg.ray.elastic_wait_s, lambda: bool(stop.received))
        if size is None:
            log.warning("elastic: no worker group of %s fits the cluster%s; exit %d asks to requeue", sizes,
                        "" if stop.received else f" after ray.elastic_wait_s={cfg.ray.elastic_wait_s:g}s",
                        cfg.checkpoint.requeue_exit_code)
            return cfg.checkpoint.requeue_exit_code
        stop_file = new_stop_file(resolved.run_dir)
        # The group holds its workers' resources once it writes metrics (Ray starts a group whole).
        placed = written_since(resolved.run_dir.metrics, time.time())
        watcher = GrowWatcher(size, sizes, per_worker, stop_file, grow_after, placed).start()
        try:
            code = _train(resolved, stop, stop_file, size, max_failures=0)
        except Exception as exc:  # the group failed: a worker or node lost, or the trainer raised
            from ray.train import TrainingFailedError

            if not isinstance(exc, TrainingFailedError) or (0 <= cfg.ray.max_failures <= failures):
                raise
            failures += 1
            log.warning("elastic: the worker group of %d failed (%s); attempt %d of %s on what the cluster can "
                        "place now", size, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                        failures + 1, "unlimited" if cfg.ray.max_failures < 0 else cfg.ray.max_failures + 1)
            continue
        finally:
            watcher.close()
            stop_file.unlink(missing_ok=True)
        if watcher.target is None or stop.received or code != cfg.checkpoint.requeue_exit_code:
            return code
        grow_after = time.monotonic() + cfg.ray.grow_every_s


def _train(resolved: ResolvedRun, stop: DriverStop, stop_file: Path, num_workers: int, max_failures: int) -> int:
    cfg, run_dir = resolved.config, resolved.run_dir
    requeue_code = cfg.checkpoint.requeue_exit_code
    stop.attach(stop_file)
    wait_s = job_stop_wait_s(os.environ)
    if stop.received:
        log.warning("%s before training started: nothing new to save; exit %d asks to requeue", stop.received,
                    requeue_code)
        return requeue_code
    log.info("Ray Train: %d workers (%s), max_failures=%d, run dir %s; stop file %s", num_workers,
             "GPU" if cfg.ray.use_gpu else "CPU", max_failures, run_dir, stop_file.name)
    if wait_s is not None and wait_s < cfg.ray.stop_wait_s:
        log.warning("Ray kills this job %d s after `ray job stop` (RAY_JOB_STOP_WAIT_TIME_S), less than "
                    "ray.stop_wait_s=%d: its stop checkpoint may be cut short. Submit with `bigmodel launch ray`, "
                    "or add --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"%d\"}}'", wait_s,
                    cfg.ray.stop_wait_s, cfg.ray.stop_wait_s)
    result = _fit_hearing_stops(build_trainer(resolved, stop_file, num_workers, max_failures), stop, wait_s)
    if result.error is not None:  # fit() raises in current Ray; older versions return the error
        raise result.error
    why = stop_reason(stop_file)  # what the driver wrote into the stop file: a signal it got, or a grow request
    code = exit_code(LaunchEnd(run_dir, 0, Markers.of_launch(run_dir, str(stop_file)),
                               stop_asked=(why or stop.received) if stop.received else None,
                               stop_took_s=time.monotonic() - stop.received_at if stop.received_at else None,
                               grow_request=why if (why or "").startswith(GROW_PREFIX) else None,
                               resume_hint=f"resubmitting run name {cfg.name!r} resumes there"), cfg)
    if code == 0:
        log.info("done: checkpoints in %s, metrics in %s", run_dir.checkpoints, run_dir.metrics)
    return code


def _fit_hearing_stops(trainer, stop: DriverStop, wait_s: int | None):
    """`trainer.fit()`, run in a thread. Python runs signal handlers in the main thread only, between
    bytecodes, so the main thread waits here where it can take them; Ray Train, when fit() runs in the
    main thread, also replaces our SIGINT handler with an abort that would lose the stop checkpoint."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=FIT_THREAD, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(FIT_JOIN_S)
        stop.announce_once(wait_s)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _log_working_dir() -> None:
    """What `ray job submit --working-dir` sent (the job runs in Ray's copy of it). Counted raw, without
    the ignore rules, so a file that slipped through shows up here."""
    total, count = 0, 0
    for root, _dirs, files in os.walk("."):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
                count += 1
            except OSError:
                pass
    log.info("working dir %s: %d files, %.2f MiB", os.getcwd(), count, total / 2**20)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    stop = DriverStop()  # from the first line: a stop may come while the data is being prepared
    setup_logging()
    try:
        code = report_user_errors(lambda: run(argv[0], argv[1:], stop))
    finally:
        stop.close()
    if any(thread.name == CONNECT_THREAD and thread.is_alive() for thread in threading.enumerate()):
        sys.stdout.flush()
        os._exit(code)  # Ray's half-open connection (still retrying) would hold interpreter shutdown
    return code

