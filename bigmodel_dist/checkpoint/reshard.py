"""Resume on another world size or ZeRO stage: convert to DeepSpeed's universal checkpoint first.

The conversion (DeepSpeed's `ds_to_universal`) runs once per checkpoint on rank 0 and is cached next to
it in `checkpoints/.universal/<step>/`; the checkpoint itself is never modified. The engine then loads
it with `checkpoint.load_universal`. Model-state file names differ by stage (ZeRO-3 writes one per rank,
ZeRO 0-2 one in all), so the cache also gets the names the target stage looks for.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bigmodel_dist.checkpoint.integrity import DS_TAG
from bigmodel_dist.errors import UserInputError

log = logging.getLogger(__name__)

DONE = "CONVERTED"


def universal_cache_dir(ckpt: Path) -> Path:
    return ckpt.parent / ".universal" / ckpt.name


def convert_to_universal(ckpt: Path, target_world_size: int, target_stage: int) -> Path:
    """The universal copy of `ckpt` for `target_world_size` ranks at `target_stage` (rank 0 only)."""
    out = universal_cache_dir(ckpt) / f"ws{target_world_size}-z{target_stage}"
    if (out / DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".converting-"))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / DS_TAG),
               "--output_folder", str(tmp / DS_TAG), "--num_extract_workers", "2", "--num_merge_workers", "1"]
    log.info("converting %s to a universal checkpoint for %d rank(s) at ZeRO-%d", ckpt.name, target_world_size,
             target_stage)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserInputError(f"checkpoint {ckpt}: DeepSpeed's universal conversion failed ({tail}); resume on the "
                             "world size and ZeRO stage it was written with")
    _add_model_state_names(tmp / DS_TAG, target_world_size, target_stage)
    if target_stage == 3:
        _add_stage3_optimizer_state(tmp / DS_TAG / "zero")
    for rng in ckpt.glob("random_states_*.pkl"):  # ranks that existed before keep their RNG streams
        shutil.copy2(rng, tmp / rng.name)
    (tmp / DONE).write_text("ok\n")
    os.replace(tmp, out)
    return out


def _add_stage3_optimizer_state(zero_dir: Path) -> None:
    """ZeRO-3's universal loader reads the Adam step and hyper-parameters from an `optimizer_state_dict`
    entry that a ZeRO 0-2 checkpoint's conversion lacks; build it from the per-parameter step files."""
    import torch

    path = zero_dir / "optimizer_state.pt"
    state = torch.load(path, weights_only=False)
    if "optimizer_state_dict" in state:
        return
    step = torch.load(next(zero_dir.glob("*/step.pt")), weights_only=False)
    state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, path)


def _add_model_state_names(tag_dir: Path, world_size: int, stage: int) -> None:
    """Give the target stage the model-state file names it opens; the universal loader reads the
    weights and optimizer states from `zero/`, these files carry shapes and client state."""
    source = next(iter(sorted(tag_dir.glob("*model_states.pt"))), None)
    if source is None:
        raise UserInputError(f"universal checkpoint {tag_dir}: no model states file; the conversion is incomplete")
    wanted = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if stage == 3
              else ["mp_rank_00_model_states.pt"])
    for name in wanted:
        if not (tag_dir / name).exists():
            shutil.copy2(source, tag_dir / name)
