"""The one bound tests put on waiting: a guard against a hang, never a speed requirement.

Tests wait on events (a file, a log line, a job state), polling through tests/helpers/waiting.py's
`wait_until`. Machines of one kind differ by 2-4x in speed, and a fresh process has been seen to need
minutes before its first step, so no wait is tuned to a machine; this bound only turns a hang into a
failure. BIGMODEL_TEST_HANG_GUARD_S changes it.
"""

from __future__ import annotations

import os

HANG_GUARD_S = float(os.environ.get("BIGMODEL_TEST_HANG_GUARD_S", "900"))
