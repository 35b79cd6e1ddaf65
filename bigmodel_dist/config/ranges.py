"""A count or a range of counts, as users write them: `4`, `2..4` (Ray's `ray.num_workers`) or `2:4`
(torchrun's `--nnodes`). One parser, so both spellings mean the same everywhere."""

from __future__ import annotations

import re
from collections.abc import Callable

from bigmodel_dist.core.errors import UserInputError

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(?:\.\.|:)\s*(\d+)\s*)?$")


def parse_size_range(text: str | int, name: str,
                     error: Callable[[str], Exception] = UserInputError) -> tuple[int, int]:
    """(min, max): "4" -> (4, 4); "2..4" and "2:4" -> (2, 4). Anything else, a minimum below 1 or above the
    maximum: `error(message)`, the message naming `name` (a CLI option or a config field)."""
    found = _RANGE.match(str(text))
    if not found:
        raise error(f"{name} {str(text).strip()!r}: give a number or MIN..MAX (MIN:MAX works too), e.g. 2..4")
    low = int(found.group(1))
    high = int(found.group(2)) if found.group(2) is not None else low
    if not 1 <= low <= high:
        raise error(f"{name} {str(text).strip()}: needs 1 <= MIN <= MAX")
    return low, high
