"""Registers `slurm_cluster` for the tests in this folder (tests/conftest.py registers it for the rest)."""

from .fixtures import slurm_cluster  # noqa: F401
