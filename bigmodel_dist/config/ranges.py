"""A count or a range of counts, as users write them: `4`, `2..4` (Ray's `ray.num_workers`) or `2:4`
(torchrun's `--nnodes`). One parser, so both spellings mean the same everywhere."""

from __future__ import annotations

import re

from bigmodel_dist.core.errors import ConfigError, UserInputError

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(?:\.\.|:)\s*(\d+)\s*)?$")


def parse_size_range(text: str | int, name: str, config_field: bool = False) -> tuple[int, int]:
    """(min, max): "4" -> (4, 4); "2..4" and "2:4" -> (2, 4). Anything else, or not 1 <= min <= max: a
    one-line error naming `name`, a command-line option or (`config_field`) a config field."""
    given = str(text).strip()
    found = _RANGE.match(given)
    low = int(found.group(1)) if found else 0
    high = int(found.group(2)) if found and found.group(2) is not None else low
    reason = ("give a number or MIN..MAX (MIN:MAX works too), e.g. 2..4" if not found else
              "needs 1 <= MIN <= MAX" if not 1 <= low <= high else None)
    if reason is None:
        return low, high
    if config_field:
        raise ConfigError(name, f"{given!r}: {reason}")
    raise UserInputError(f"{name} {given}: {reason}")
