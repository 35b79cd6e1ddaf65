"""Fault injection for tests and drills: a hung rank, a slow rank or node, poisoned data. Test-only.

Faults come from the environment, never from a config file that could be copied into a real run:

    BIGMODEL_FAULTS="hang:rank=1,step=3;nan:samples=96-112"  BIGMODEL_ALLOW_FAULTS=1

Without `BIGMODEL_ALLOW_FAULTS=1` a non-empty `BIGMODEL_FAULTS` is refused (exit 2), so a fault can
never be active by accident. Steps are numbered as they are logged (the first step is 1); sample
ranges are global sample indices, start included, end excluded.

| name      | fields                         | effect                                                            |
| --------- | ------------------------------ | ----------------------------------------------------------------- |
| hang      | rank, step                     | that rank sleeps for ever in the forward pass of that step        |
| slow      | rank, seconds[, from_step]     | that rank sleeps `seconds` in every forward pass (a straggler)    |
| nan       | samples                        | a micro-batch holding one of those samples has a NaN loss         |
| spike     | samples[, scale]               | ... has its loss multiplied by `scale` (default 100)              |
| slow_node | rank[, factor]                 | the health check's matmul on that rank runs `factor` x slower     |
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bigmodel_dist.core.env import ALLOW_FAULTS, FAULTS
from bigmodel_dist.core.errors import UserInputError

_FIELDS = {  # name -> (required fields, optional fields)
    "hang": ({"rank", "step"}, set()),
    "slow": ({"rank", "seconds"}, {"from_step"}),
    "nan": ({"samples"}, set()),
    "spike": ({"samples"}, {"scale"}),
    "slow_node": ({"rank"}, {"factor"}),
}


@dataclass(frozen=True)
class Fault:
    name: str
    fields: dict[str, str] = field(default_factory=dict)

    def number(self, key: str, default: float | None = None) -> float:
        value = self.fields.get(key)
        return default if value is None and default is not None else float(value)  # type: ignore[arg-type]

    def samples(self) -> range:
        start, _, end = self.fields["samples"].partition("-")
        return range(int(start), int(end or int(start) + 1))


@dataclass(frozen=True)
class Faults:
    """The injected faults of this process; `Faults()` (none) in every real run."""

    faults: tuple[Fault, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def of(self, name: str, rank: int | None = None) -> list[Fault]:
        return [f for f in self.faults if f.name == name and (rank is None or int(f.fields.get("rank", rank)) == rank)]

    # ---- in the training step ---------------------------------------------------------------------
    def in_forward(self, rank: int, step: int) -> None:
        """Called in every forward pass of `step` (1-based) on `rank`: hangs or slows it down."""
        for fault in self.of("slow", rank):
            if step >= fault.number("from_step", 1):
                time.sleep(fault.number("seconds"))
        for fault in self.of("hang", rank):
            if step == int(fault.number("step")):
                _sleep_for_ever()

    def loss_scale(self, sample_indices: list[int]) -> float:
        """1.0, NaN, or a spike factor for a micro-batch that holds poisoned samples."""
        scale = 1.0
        for fault in self.of("nan") + self.of("spike"):
            poisoned = fault.samples()
            if any(i in poisoned for i in sample_indices):
                scale *= float("nan") if fault.name == "nan" else fault.number("scale", 100.0)
        return scale

    def matmul_slowdown(self, rank: int) -> float:
        factors = [f.number("factor", 4.0) for f in self.of("slow_node", rank)]
        return max(factors, default=1.0)


def _sleep_for_ever() -> None:
    """The injected hang: what the watchdog's stack dump should name."""
    while True:
        time.sleep(3600)


def faults_from_env(env: Mapping[str, str] | None = None) -> Faults:
    """The faults `BIGMODEL_FAULTS` asks for; a one-line UserInputError for anything malformed or unknown,
    or when `BIGMODEL_ALLOW_FAULTS=1` is missing."""
    env = os.environ if env is None else env
    spec = env.get(FAULTS, "").strip()
    if not spec:
        return Faults()
    if env.get(ALLOW_FAULTS) != "1":
        raise UserInputError(f"{FAULTS} is set ({spec!r}) but fault injection is test-only; set "
                             f"{ALLOW_FAULTS}=1 to allow it, or unset {FAULTS}")
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, rest = item.partition(":")
        if name not in _FIELDS:
            raise UserInputError(f"{FAULTS}: unknown fault {name!r} in {item!r}; known: {sorted(_FIELDS)}")
        fields = {}
        for pair in filter(None, rest.split(",")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise UserInputError(f"{FAULTS}: {item!r}: {pair!r} is not key=value")
            fields[key.strip()] = value.strip()
        required, optional = _FIELDS[name]
        if required - set(fields) or set(fields) - required - optional:
            raise UserInputError(f"{FAULTS}: {item!r}: {name} takes {sorted(required)} and optionally "
                                 f"{sorted(optional)}, got {sorted(fields)}")
        fault = Fault(name, fields)
        try:
            [fault.number(k) for k in fields if k != "samples"]
            if "samples" in fields and not fault.samples():
                raise ValueError("empty range")
        except ValueError as exc:
            raise UserInputError(f"{FAULTS}: {item!r}: {exc}") from None
        faults.append(fault)
    return Faults(tuple(faults))
