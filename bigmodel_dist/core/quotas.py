"""Whole-number shares of a total by weight (largest remainder): the mixture's slots per window.

No project imports: the config schema checks quotas with it, the mixture schedule uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` slots split in proportion to `weights`: floors, then the largest remainders (ties to the
    earlier weight) get one more. Sums to `total` exactly."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [math.floor(x + 1e-9) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - shares[k]), k))
    for k in by_remainder[: total - sum(shares)]:
        shares[k] += 1
    return shares
