"""User-facing errors: each prints as one line naming the field or file and the fix; the CLI exits 2."""

from __future__ import annotations

EXIT_USAGE = 2


class UserInputError(Exception):
    """Something the user gave us (a config value, a file) is wrong; the message says what fixes it."""


class ConfigError(UserInputError):
    """A config field is wrong; carries its dotted path."""

    def __init__(self, path: str, message: str):
        super().__init__(f"config field {path}: {message}")
        self.path = path


EXIT_RUN_FAILED = 1


class RunFailedError(Exception):
    """The run cannot go on for a reason outside the config (a full disk, an unwritable checkpoint); the
    message names the rank, the path and the cause. Not retried: requeueing would meet the same wall.

    `on_every_rank`: every rank raised it alike (an agreed failure), so rank 0 alone reports it.
    """

    def __init__(self, message: str, on_every_rank: bool = False):
        super().__init__(message)
        self.on_every_rank = on_every_rank
