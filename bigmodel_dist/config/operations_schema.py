"""The sections that say how a run is operated: `ray` (Ray Train scaling, failures, storage) and `resilience`
(hangs, bad nodes, stragglers, loss spikes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_dist.config.fields import require_positive
from bigmodel_dist.core.errors import ConfigError


@dataclass
class RayConfig:
    """Read by `python -m launcher.ray_job` only: the Ray Train scaling, failure and storage settings."""

    num_workers: int | str = 2
    """Ray Train workers (= data-parallel ranks), one per GPU on GPU clusters; `MIN..MAX` (e.g. "8..16")
    trains elastically: on as many workers as the cluster can place, between the two, shrinking when a
    worker or node is lost and growing back at a checkpoint (docs: README, Elastic training)."""
    use_gpu: bool = False
    """Give each worker `gpus_per_worker` GPUs (NCCL); False runs on CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs Ray reserves per worker (also sets the worker's thread count)."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves per worker when use_gpu is set."""
    max_failures: int = 3
    """Worker-group restarts after a failure (FailureConfig); -1 retries forever."""
    storage_path: str | None = None
    """Ray's storage_path; None uses output_dir, so Ray's run folder is the run directory itself."""
    checkpoints_to_keep: int | None = None
    """CheckpointConfig(num_to_keep) for Ray's checkpoint records; None follows checkpoint.keep_last."""
    address: str | None = None
    """Ray cluster to join; None means RAY_ADDRESS (set by `ray job submit`) or a running local cluster."""
    connect_timeout_s: float = 60.0
    """Seconds to wait for the cluster before giving up with an error."""
    stop_wait_s: int = 300
    """Seconds Ray waits after `ray job stop`'s SIGTERM before it SIGKILLs the job (RAY_JOB_STOP_WAIT_TIME_S,
    Ray's default 3; `bigmodel launch ray` sets it for the job): must cover one step and one checkpoint save."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also needs (e.g. `{trainer_slot: 1}` to keep workers on the
    nodes that advertise it)."""
    grow_every_s: float = 600.0
    """Elastic runs grow back (when the cluster can place more workers) at most once per this many
    seconds, by saving a checkpoint and restarting the group larger from it."""
    elastic_wait_s: float = 600.0
    """An elastic run that cannot place even its minimum of workers waits this long for them, then exits
    with checkpoint.requeue_exit_code (resubmitting resumes)."""

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers: both `num_workers` when it is a number."""
        from bigmodel_dist.config.ranges import parse_size_range

        return parse_size_range(self.num_workers, "ray.num_workers", config_field=True)

    @property
    def elastic(self) -> bool:
        low, high = self.worker_range()
        return low < high

    def check(self) -> None:
        self.worker_range()
        require_positive("ray", cpus_per_worker=self.cpus_per_worker, connect_timeout_s=self.connect_timeout_s,
                          stop_wait_s=self.stop_wait_s, grow_every_s=self.grow_every_s,
                          elastic_wait_s=self.elastic_wait_s)
        for name, amount in self.resources_per_worker.items():
            if amount <= 0:
                raise ConfigError(f"ray.resources_per_worker.{name}", f"must be > 0, got {amount}")
        if self.use_gpu:
            require_positive("ray", gpus_per_worker=self.gpus_per_worker)
        if self.max_failures < -1:
            raise ConfigError("ray.max_failures", f"must be >= -1 (-1: retry forever), got {self.max_failures}")
        if self.checkpoints_to_keep is not None:
            require_positive("ray", checkpoints_to_keep=self.checkpoints_to_keep)


@dataclass
class ResilienceConfig:
    """Hangs, bad nodes, stragglers and loss spikes: detected, diagnosed and recovered from without a person."""

    enabled: bool = True
    """The in-loop guards: progress records for the hang watchdog, loss/gradient checks, straggler timing."""
    hang_timeout_s: float = 600.0
    """A node whose ranks all make no progress within a step for this long is declared hung: every local
    rank's stacks go to RUN_DIR/logs/hang-<time>/, the job's processes end, and it exits `hang_exit_code`."""
    startup_timeout_s: float = 1800.0
    """The same limit from process start to the first step (data, model, engine, checkpoint load)."""
    save_timeout_s: float = 1800.0
    """The same limit while a checkpoint is being saved."""
    hang_exit_code: int = 86
    """Exit code of a job that hung: the Slurm script requeues it avoiding the suspect node."""
    health_check: bool = True
    """Check every node (matmul, memory, all-reduce bus bandwidth) before training on Slurm and Ray."""
    health_slow_factor: float = 2.0
    """A node whose matmul throughput (or, on GPU, free memory) is this many times below the other nodes'
    median is bad; on one node, ranks are compared."""
    bad_node_exit_code: int = 87
    """Exit code of a failed health check: the Slurm script requeues it avoiding the named node."""
    straggler_factor: float = 1.5
    """A rank whose compute time per step exceeds the median rank's by this factor is a straggler..."""
    straggler_intervals: int = 3
    """...when it does so for this many log intervals in a row (then it is reported once per streak)."""
    spike_window: int = 50
    """Recent good steps whose mean loss is the reference for spike detection."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this many times the recent mean (window at least a fifth full) is bad."""
    max_bad_steps: int = 3
    """Bad steps (non-finite or spiking loss or gradient norm; each one skipped) in a row before rolling
    back to the last good checkpoint and skipping the data those steps read."""
    rollback_lr_factor: float = 1.0
    """Multiply the learning rate by this after each rollback (1.0 keeps it)."""
    max_rollbacks: int = 5
    """Rollbacks in one run before it stops with an error: a run that keeps diverging needs a person."""

    def check(self) -> None:
        require_positive("resilience", hang_timeout_s=self.hang_timeout_s, startup_timeout_s=self.startup_timeout_s,
                          save_timeout_s=self.save_timeout_s, health_slow_factor=self.health_slow_factor,
                          straggler_factor=self.straggler_factor, straggler_intervals=self.straggler_intervals,
                          spike_window=self.spike_window, spike_factor=self.spike_factor,
                          max_bad_steps=self.max_bad_steps, max_rollbacks=self.max_rollbacks)
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise ConfigError("resilience.rollback_lr_factor", f"must be in (0, 1], got {self.rollback_lr_factor}")
        for name in ("hang_exit_code", "bad_node_exit_code"):
            if not 1 <= getattr(self, name) <= 255:
                raise ConfigError(f"resilience.{name}", f"must be in 1..255, got {getattr(self, name)}")
        if self.health_slow_factor <= 1.0 or self.straggler_factor <= 1.0 or self.spike_factor <= 1.0:
            bad = next(n for n in ("health_slow_factor", "straggler_factor", "spike_factor") if getattr(self, n) <= 1.0)
            raise ConfigError(f"resilience.{bad}", f"must be > 1 (a ratio to the median or mean), got {getattr(self, bad)}")
