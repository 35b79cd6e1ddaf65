"""Elastic Ray training (`ray.num_workers: MIN..MAX`): how many workers each attempt gets, and when to grow.

Ray Train's own elastic mode (a `(min, max)` ScalingConfig) starts as many workers as the cluster can
place and, while they run, restarts the group larger whenever resources appear. Both lose something
here: a count that does not divide the global batch would change the optimisation (or fail every
attempt), and a restart between checkpoints throws away the steps since the last one. So the driver
(`launcher/ray/job.py`) sizes each attempt itself and hands Ray a fixed size:

- each attempt gets the largest size in MIN..MAX that keeps `train.global_batch_size` (micro batch x
  workers divides it) and that the cluster's free resources can place, node by node;
- a lost worker or node fails the attempt; the driver starts the next one on what is left (a failure
  counts against `ray.max_failures`), resuming from the newest checkpoint on the new world size;
- while an attempt runs below MAX, `GrowWatcher` looks for free resources; when a larger size fits and
  `ray.grow_every_s` has passed since the last resize, it asks the workers to stop through the run's
  stop file: they save a checkpoint at the step they are in, and the next attempt starts larger from
  it. No step is lost by growing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bigmodel_dist.config.layout import sizes_keeping_batch
from bigmodel_dist.config.schema import Config
from bigmodel_dist.ft.resize import GROW_PREFIX
from launcher.ray.stop import request_stop

log = logging.getLogger(__name__)

GROW_POLL_S = 2.0  # how often a running attempt below its maximum looks for free resources



def worker_counts(cfg: Config) -> list[int]:
    """The worker counts in `ray.num_workers` that keep the global batch (one worker is one rank)."""
    return sizes_keeping_batch(cfg.train, cfg.ray.worker_range(), 1, "ray.num_workers")


def worker_resources(cfg: Config) -> dict[str, float]:
    """What Ray reserves for one worker."""
    resources = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return resources


def placeable_workers(free_by_node: Mapping[str, Mapping[str, float]], per_worker: Mapping[str, float]) -> int:
    """How many workers the free resources can hold, node by node (a worker never spans nodes)."""
    total = 0
    for free in free_by_node.values():
        total += int(min(free.get(name, 0.0) // amount for name, amount in per_worker.items() if amount > 0))
    return total


def best_size(sizes: Sequence[int], placeable: int) -> int | None:
    """The largest size that keeps the batch and fits, or None."""
    fitting = [size for size in sizes if size <= placeable]
    return max(fitting) if fitting else None


def free_resources_by_node() -> dict[str, dict[str, float]]:
    """Free resources of every live node (Ray's per-node view; the public API sums over nodes)."""
    from ray._private.state import available_resources_per_node

    return {node: dict(free) for node, free in available_resources_per_node().items()}


def wait_for_size(sizes: Sequence[int], per_worker: Mapping[str, float], wait_s: float, stopped: Callable[[], bool],
                  read_free: Callable[[], Mapping[str, Mapping[str, float]]] = free_resources_by_node,
                  poll_s: float = GROW_POLL_S) -> int | None:
    """The size of the next attempt: the best that fits now, or after waiting up to `wait_s` for the
    minimum to fit (None when it never did, or a stop came)."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        size = best_size(sizes, placeable_workers(read_free(), per_worker))
        if size is not None or stopped() or time.monotonic() > deadline:
            return size
        if not warned:
            log.warning("elastic: the cluster cannot place %d worker(s) of %s now; waiting up to %.0f s "
                        "(ray.elastic_wait_s)", min(sizes), dict(per_worker), wait_s)
            warned = True
        time.sleep(poll_s)


def written_since(path: Path, since: float) -> Callable[[], bool]:
    """True once `path` has been written after `since` (time.time())."""
    def check() -> bool:
        try:
            return path.stat().st_mtime > since
        except OSError:
            return False
    return check


class GrowWatcher:
    """While an attempt runs with `size` workers, asks it to stop and save when a larger size that keeps
    the batch fits in the free resources, no sooner than `not_before` (time.monotonic()) and only once
    `placed()` says the attempt's own workers hold theirs (until then their resources look free)."""

    def __init__(self, size: int, sizes: Sequence[int], per_worker: Mapping[str, float], stop_file: Path,
                 not_before: float, placed: Callable[[], bool],
                 read_free: Callable[[], Mapping[str, Mapping[str, float]]] = free_resources_by_node,
                 poll_s: float = GROW_POLL_S):
        self.size, self.sizes, self.per_worker = size, list(sizes), dict(per_worker)
        self.stop_file, self.not_before, self.placed = stop_file, not_before, placed
        self._read, self._poll_s = read_free, poll_s
        self.target: int | None = None  # the size it asked for
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bigmodel-grow-watch", daemon=True)

    def start(self) -> GrowWatcher:
        if self.size < max(self.sizes):
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(self._poll_s):
            if time.monotonic() < self.not_before or not self.placed():
                continue
            try:
                larger = best_size(self.sizes, self.size + placeable_workers(self._read(), self.per_worker))
            except Exception as exc:  # the GCS busy or restarting: look again later
                log.debug("elastic: free resources unknown (%s)", exc)
                continue
            if larger is not None and larger > self.size:
                self.target = larger
                log.warning("elastic: the cluster can place %d workers now (running %d): saving a checkpoint and "
                            "restarting the group larger from it", larger, self.size)
                request_stop(self.stop_file, f"{GROW_PREFIX} from {self.size} to {larger} workers")
                return

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
