"""Checks shared by the config sections' `check()` methods."""

from __future__ import annotations

from bigmodel_dist.core.errors import ConfigError


def require_positive(section: str, **values: float) -> None:
    """Each value > 0, or a ConfigError naming `section.name`."""
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name}", f"must be > 0, got {value}")
