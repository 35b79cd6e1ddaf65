"""The distributed facts of this process (rank, world size, node), read once from the environment.

torchrun, `accelerate launch`, srun + torchrun and Ray Train all export the torchrun variables; this is
the only module of the library that reads them. Everything else receives a `DistributedFacts`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from bigmodel_dist.core.env import LAUNCH_ID, STOP_FILE

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedFacts:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    job_end_time: float | None = None  # Unix time the allocation ends (Slurm), for the time-limit guard
    stop_file: str | None = None  # a file whose appearance asks for a stop (`bigmodel launch local` sets it)
    # One launch of a run, the same on every node (the Slurm script: job id and restart; `launch local`: its own
    # unless one is set; the Ray driver: its stop file). Written into the run's markers, so a launcher never takes
    # another launch's COMPLETED for its own.
    launch_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.world_size}]"


def torchrun_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torchrun variables for a process that srun started directly (one task per GPU), or {}
    when a launcher (torchrun) already set them or this is not a Slurm task."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": per_node or env["SLURM_NTASKS"],
        "GROUP_RANK": env.get("SLURM_NODEID", "0"),
    }


def facts_from_env(env: Mapping[str, str] | None = None) -> DistributedFacts:
    """Facts from torchrun-style variables; a plain `python` process is rank 0 of 1."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} LOCAL_RANK={local_rank} WORLD_SIZE={world_size}")
    return DistributedFacts(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", str(rank // local_world_size)))),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        job_end_time=float(env["SLURM_JOB_END_TIME"]) if env.get("SLURM_JOB_END_TIME") else None,
        stop_file=env.get(STOP_FILE) or None,
        launch_id=env.get(LAUNCH_ID) or None,
    )


def broadcast_from_rank0(value: T | None) -> T:
    """Rank 0's `value` on every rank (what other ranks pass is ignored; None will do).

    Collective: every rank calls it. The value is pickled, so keep it small (a decision, a list of names).
    """
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0_then_shared(is_main: bool, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and give every rank its result, or its user error.

    Collective: every rank calls it. A UserInputError on rank 0 is raised on all ranks, so none is left
    waiting in a later collective.
    """
    from bigmodel_dist.core.errors import UserInputError

    outcome: tuple[Any, str | None] = (None, None)  # (result, error message)
    if is_main:
        try:
            outcome = (work(), None)
        except UserInputError as exc:
            outcome = (None, str(exc))
    result, error = broadcast_from_rank0(outcome)
    if error:
        raise UserInputError(error)
    return result


# What gloo and NCCL say when a peer process is gone (it died, or was killed after its own error).
PEER_LOSS_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
                      "NCCL communicator was aborted")


def lost_peers(exc: BaseException) -> bool:
    """Whether `exc` is a collective that broke because another rank went away."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistNetworkError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_LOSS_MESSAGES)


def first_line(exc: BaseException) -> str:
    """The gist of an error: its first sentence, without a C++ source location in front."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    return text.split(". ")[0].splitlines()[0][:300] if text else type(exc).__name__
