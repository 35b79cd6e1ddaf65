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
