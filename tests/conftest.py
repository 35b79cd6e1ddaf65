"""Shared fixtures: a small local corpus config and a tokenizer/data cache reused across tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .cluster.fixtures import ray_cluster, slurm_cluster  # noqa: F401  (real local clusters, session-wide)

REPO = Path(__file__).resolve().parents[1]

# Settings every spawned rank must share: tiny model, small corpus, no W&B network.
TINY = [
    "--model.preset=gpt2-tiny",
    "--data.max_bytes=400000",
    "--data.seq_len=128",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=2",
    "--train.log_every=1",
    "--logging.wandb_mode=disabled",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer + packed-data cache for the whole session (training a BPE takes seconds)."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def tiny_overrides(tmp_path, data_cache) -> list[str]:
    return [*TINY, f"--output_dir={tmp_path}", f"--data.cache_dir={data_cache}"]


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `bigmodel` subprocesses: this interpreter's scripts first, quiet W&B."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_SILENT"] = "true"
    return env
