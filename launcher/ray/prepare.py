"""`bigmodel prepare CONFIG --on ray`: this process plans and finalizes; Ray tasks write the shards.

This process is the Ray driver: it connects to a running cluster (`--address HOST:PORT` of its GCS, or
RAY_ADDRESS, or the cluster of this node), so run it on a node of the cluster, or submit it:
`ray job submit --working-dir . -- bigmodel prepare CONFIG --on ray`. Every path in the config must be
on storage every node sees (the inputs, `data.cache_dir`, `data.prepared_dir`).

Plan here (tokenizer trained or loaded once, saved into each prepared folder; shards counted; meanwhile
one warm-up task per CPU slot starts the workers), one Ray task per shard (each asks for `data.num_proc`
CPUs, 1 when 0, and tokenises with as many threads; Ray places them on every node and reuses its
workers, which keep each plan's documents and tokenizer loaded), then finalize here (meta.json). A task
that fails for a system reason (its worker or node died) is retried by Ray (MAX_RETRIES); its shard is
written again from the start. A shard already complete is skipped by its task, so a second `--on ray`
after any failure redoes only what is missing, and one after success writes nothing.
"""

from __future__ import annotations

import functools
import logging
import os

from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.data.mixture_sources import run_plans
from bigmodel_dist.data.prepare_plan import Plan, ShardWriter, Unit, all_units, finalize

log = logging.getLogger(__name__)
MAX_RETRIES = 3  # Ray's own retry of a task whose worker died


@functools.lru_cache(maxsize=4)
def _writer(plan_json: str) -> ShardWriter:
    """One writer per plan in each worker process, kept across the tasks Ray gives that worker: a warm
    tokenizer (its BPE word cache) tokenises code ~1.5x faster than a fresh one, which a task per shard
    would otherwise pay every time."""
    return ShardWriter(Plan.from_json(plan_json))


def write_shards_task(plans_json: list[str], units: list[Unit], num_threads: int) -> int:
    """The Ray task: write these shards (complete ones skipped); returns how many it was given."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))  # before this worker's first tokenizer use
    for plan, shard in units:
        _writer(plans_json[plan]).write(shard)
    return len(units)


def warm_up_task() -> None:
    """Import what the shard tasks need: run while the driver plans, it starts the workers meanwhile."""
    import datasets  # noqa: F401
    import tokenizers  # noqa: F401


def prepare_on_ray(config: Config, vocab_size: int, address: str | None) -> None:
    """Complete every prepared folder of the run on the Ray cluster at `address`."""
    address = _driver_address(address)
    import ray

    _connect(ray, address)
    cpus = config.data.num_proc or 1
    slots = max(1, int(ray.cluster_resources().get("CPU", 0) // cpus))
    warm_up = ray.remote(num_cpus=cpus)(warm_up_task)
    warming = [warm_up.remote() for _ in range(slots)]  # workers start while this process plans
    plans = run_plans(config, vocab_size)
    if not plans:
        log.info("prepared data complete; nothing to do on Ray")
        return
    ray.get(warming)  # a worker that cannot import the project fails here, before any shard
    units = all_units(plans)
    task = ray.remote(num_cpus=cpus, max_retries=MAX_RETRIES)(write_shards_task)
    plans_ref = ray.put([p.to_json() for p in plans])  # once into the object store, not once per task
    log.info("writing %d shard(s) of %d folder(s) as %d Ray task(s) of %d CPU(s); cluster: %s", len(units), len(plans),
             len(units), cpus, ray.cluster_resources())
    pending = [task.remote(plans_ref, [unit], cpus) for unit in units]
    done = 0
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            done += ray.get(finished[0])
            log.info("shards written or found complete: %d/%d", done, len(units))
    except ray.exceptions.RayTaskError as exc:
        for ref in pending:
            ray.cancel(ref)
        if isinstance(exc.cause, UserInputError):
            raise exc.cause from None
        log.error("a shard task failed (%s: %s); the same command again redoes only the incomplete shards",
                  type(exc.cause).__name__, exc.cause)
        raise
    for plan in plans:
        finalize(plan)


def _driver_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        raise UserInputError(f"Ray address {address} is a dashboard (for `ray job submit`); `prepare --on ray` joins "
                             "the cluster as a driver: run it on a cluster node (--address auto or HEAD:6379), or "
                             "`ray job submit --address ... -- bigmodel prepare CONFIG --on ray`")
    return address


def _connect(ray, address: str) -> None:
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UserInputError(f"no Ray cluster at {address} ({exc}); start one (ray start --head) or pass "
                             "--address HEAD:6379 / set RAY_ADDRESS") from None
