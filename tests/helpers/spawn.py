"""A small spawn harness for multi-process tests: real gloo process groups, loopback rendezvous, timeout.

`run_distributed(fn, world_size, *args)` starts `world_size` fresh processes (forked from a server that
pre-imported the heavy libraries once), each with the torchrun environment variables set, runs
`fn(*args)` in each and returns the per-rank results in rank order. A rank that raises, or a run past `timeout_s`, fails the call with that rank's traceback.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.ports import free_port
from tests.helpers.guards import HANG_GUARD_S

# Imported once by the fork server and inherited by every rank it forks: a fresh interpreter spends
# ~8 s of a 2-core machine importing these, per rank and per run (they start no threads on import).
PRELOAD = ["torch", "deepspeed", "accelerate", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama", "bigmodel_dist.training.setup", "tests.helpers.workers"]


@functools.cache
def _rank_context(fresh_interpreters: bool) -> mp.context.BaseContext:
    """Ranks forked from a server that imported PRELOAD once (fresh processes, shared start-up), or
    fresh interpreters (spawn) where a test needs a process exactly as torchrun starts one: W&B's
    offline writer lost the values a SIGKILLed forked rank had logged, which a spawned one keeps."""
    if fresh_interpreters:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(fn: Callable, args: tuple, rank: int, world_size: int, port: int, out_dir: str,
            env: dict[str, str]) -> None:
    import torch

    os.environ.clear()  # the caller's environment now, not the fork server's from its start
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS was set
    out = Path(out_dir)
    try:
        result = fn(*args)
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _start_ranks(fn: Callable, world_size: int, args: tuple, out_dir: str, fresh_interpreters: bool) -> list:
    ctx = _rank_context(fresh_interpreters)
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(fn, args, r, world_size, port, out_dir, env))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def run_until_a_rank_dies(fn: Callable, world_size: int = 2, *args: Any, timeout_s: float = HANG_GUARD_S,
                          fresh_interpreters: bool = False) -> list[int | None]:
    """Run like `run_distributed`, for tests that kill a rank: once any rank exits abnormally, the
    others (stuck in a collective) are killed too. Returns every rank's exit code."""
    import time

    with tempfile.TemporaryDirectory(prefix="spawn-") as out_dir:
        procs = _start_ranks(fn, world_size, args, out_dir, fresh_interpreters)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(1.0)  # let the survivors notice, then end them
                break
            time.sleep(0.1)
        codes = [p.exitcode for p in procs]
        _end_survivors(procs)
        return codes


def exit_codes(fn: Callable, world_size: int = 2, *args: Any, timeout_s: float = HANG_GUARD_S) -> list[int | None]:
    """Run `fn` on every rank and wait for each to exit by itself (guarded); their exit codes."""
    with tempfile.TemporaryDirectory(prefix="spawn-") as out_dir:
        procs = _start_ranks(fn, world_size, args, out_dir, fresh_interpreters=False)
        for proc in procs:
            proc.join(timeout=timeout_s)
        codes = [proc.exitcode for proc in procs]
        _end_survivors(procs)
        return codes


def _end_survivors(procs: list) -> None:
    """Kill the ranks still running (stuck past the guard, or in a collective with a dead peer) and reap all."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout_s: float = HANG_GUARD_S,
                    fresh_interpreters: bool = False) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="spawn-") as out_dir:
        procs = _start_ranks(fn, world_size, args, out_dir, fresh_interpreters)
        deadline_hit = False
        for proc in procs:
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                deadline_hit = True
        _end_survivors(procs)
        out = Path(out_dir)
        errors = sorted(out.glob("rank*.err"))
        if errors:
            raise AssertionError(f"{errors[0].stem} failed:\n{errors[0].read_text()}")
        if deadline_hit:
            raise TimeoutError(f"distributed run did not finish within {timeout_s}s")
        results = []
        for rank, proc in enumerate(procs):
            path = out / f"rank{rank}.pkl"
            # A worker may abort in interpreter teardown after its work (gloo); its result file is the proof.
            if not path.exists():
                raise AssertionError(f"rank {rank} exited {proc.exitcode} without a result")
            results.append(pickle.loads(path.read_bytes()))
        return results
