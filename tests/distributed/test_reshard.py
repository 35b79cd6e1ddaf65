"""Resume on another world size or ZeRO stage (DeepSpeed universal checkpoints), real engines on CPU.

The data cursor is global (samples consumed), so the resumed run reads exactly the samples the straight
run would: none repeated or skipped. Losses match the straight run within a stated tolerance: fp32 with
dropout off, only the order of floating-point reductions changes with the world size (measured < 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_run
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import train_and_collect

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-4


def _overrides(tmp_path: Path, data_cache: Path, name: str, stage: int, steps: int) -> list[str]:
    return [*tiny_run(tmp_path, data_cache), f"--name={name}",
            f"--deepspeed.config=zero{stage}", "--train.eval_every=0", "--checkpoint.every=3",
            f"--train.max_steps={steps}", "--train.precision=fp32", "--model.dropout=0.0"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("straight")
    return run_distributed(train_and_collect, 2, _overrides(out, data_cache, "straight", 2, 6))[0]["losses"]


@pytest.mark.parametrize(("before", "after", "stage_before", "stage_after"),
                         [(2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 2, 3), (2, 1, 3, 2), (2, 2, 0, 3)])
def test_resume_on_another_topology_continues_the_run(tmp_path, data_cache, straight, before, after,
                                                      stage_before, stage_after):
    first = run_distributed(train_and_collect, before, _overrides(tmp_path, data_cache, "run", stage_before, 3))[0]
    second = run_distributed(train_and_collect, after, _overrides(tmp_path, data_cache, "run", stage_after, 6))[0]
    assert len(second["losses"]) == 3  # resumed at step 3, not from scratch
    np.testing.assert_allclose(first["losses"] + second["losses"], straight, atol=TOLERANCE)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006"
    meta = json.loads((ckpt / "bigmodel_meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"], meta["train_state"]["samples_seen"]) == (after, stage_after, 6 * 8)
    # the original checkpoint is untouched: the conversion lives in a cache beside it
    assert (tmp_path / "run" / "checkpoints" / ".universal" / "step_00000003").is_dir()
