"""Every ZeRO stage resumes from every ZeRO stage, across world sizes 2->1, 1->2 and 2->2, in fp32 and in bf16.

The precision is pinned per case: `precision: auto` would test bf16 on one CPU and fp32 on another.
Sources: one run per (precision, world size, stage) that trains a step and saves it, returning its full
state (fp32 master weights, Adam's moments and step). Targets: one run per (precision, world size, stage)
that starts by resuming one source (the start-up path) and then loads every other source that reaches it
into the same engine (the rollback path); after each load its full state must equal the source's,
exactly: resharding copies numbers, it computes none. It then trains on from the last one. Losses across
topologies are compared with a straight run in `test_reshard.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_run
from tests.helpers.spawn import run_distributed
from tests.helpers.workers import load_each_then_train, train_then_collect_state

pytestmark = pytest.mark.distributed
STAGES = (0, 1, 2, 3)
WORLD_SIZES = (1, 2)
PRECISIONS = ("fp32", "bf16")


def _overrides(out: Path, data_cache: Path, name: str, precision: str, stage: int, steps: int) -> list[str]:
    return [*tiny_run(out, data_cache), f"--name={name}",
            f"--deepspeed.config=zero{stage}", f"--train.precision={precision}", "--model.dropout=0.0",
            "--train.eval_every=0", "--checkpoint.every=1", f"--train.max_steps={steps}"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_cache) -> dict[tuple[str, int, int], tuple[Path, dict]]:
    """(precision, world size, stage) -> (its step-1 checkpoint, its full state there)."""
    out = tmp_path_factory.mktemp("sources")
    written = {}
    for precision in PRECISIONS:
        for world in WORLD_SIZES:
            for stage in STAGES:
                name = f"{precision}-ws{world}-z{stage}"
                state = run_distributed(train_then_collect_state, world,
                                        _overrides(out, data_cache, name, precision, stage, 1))[0]
                written[precision, world, stage] = (out / name / "checkpoints" / "step_00000001", state)
    return written


@pytest.fixture(scope="module")
def sources_listing(sources) -> dict[Path, list[tuple[str, int, int]]]:
    """Each source checkpoint's files as written, before any target loaded it."""
    return {path: _listing(path) for path, _ in sources.values()}


def _reaching(world: int, stage: int) -> list[tuple[int, int]]:
    """The sources (world size, stage) this target resumes from: 2->1, 1->2 and 2->2, any stage, not itself."""
    froms = {1: [2], 2: [1, 2]}[world]
    return [(w, s) for w in froms for s in STAGES if (w, s) != (world, stage)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_stage_and_world_size_resumes_here(tmp_path, data_cache, sources, sources_listing, precision, world,
                                                 stage):
    reaching = [sources[precision, w, s] for w, s in _reaching(world, stage)]
    first, *others = [str(path) for path, _ in reaching]
    overrides = [*_overrides(tmp_path, data_cache, "target", precision, stage, 2), f"--checkpoint.resume={first}"]
    result = run_distributed(load_each_then_train, world, overrides, others)[0]
    for (path, expected), (w, s) in zip(reaching, _reaching(world, stage)):
        loaded = result["states"][str(path)]
        # one Adam step count for every parameter (bf16 at ZeRO-0 counts 2 after one step: DeepSpeed's unfused
        # wrapper creates Adam's states with a step of zero gradients)
        assert loaded["steps"] == expected["steps"] and len(expected["steps"]) == 1, (w, s)
        assert loaded["params"].keys() == expected["params"].keys()
        for name, states in expected["params"].items():
            for key, value in states.items():
                np.testing.assert_array_equal(loaded["params"][name][key], value,
                                              err_msg=f"{precision} ZeRO-{s} on {w} -> ZeRO-{stage} on {world}: {name} {key}")
    assert len(result["losses"]) == 1 and math.isfinite(result["losses"][0])  # trains on from the last one
    # the checkpoints loaded are untouched: conversions are cached beside them
    assert all(_listing(path) == listing for path, listing in zip(
        [p for p, _ in reaching], [sources_listing[p] for p, _ in reaching]))


def _listing(ckpt: Path) -> list[tuple[str, int, int]]:
    return sorted((str(f.relative_to(ckpt)), f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.rglob("*"))
