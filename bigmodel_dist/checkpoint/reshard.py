"""Resume on another world size or ZeRO stage: through one universal copy of the checkpoint.

Once per checkpoint, rank 0 converts it to DeepSpeed's universal layout (`universal_format`), cached next
to it in `checkpoints/.universal/<step>/universal/`; the checkpoint itself is never modified. Each target
(world size, stage) then gets a small folder beside it, `ws<N>-z<S>/`: for ZeRO 1-3 the model-state file
names that stage opens and a link to the shared per-parameter states, loaded by DeepSpeed's universal
loader; for ZeRO-0, which has no universal loader, a native ZeRO-0 checkpoint written from them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_dist.checkpoint.integrity import DS_TAG
from bigmodel_dist.checkpoint.universal_format import (
    MODEL_STATES,
    copy_rng_states,
    normalize,
    param_shapes,
    stage0_to_universal,
    universal_to_stage0,
)
from bigmodel_dist.core.errors import UserInputError

log = logging.getLogger(__name__)

READY = "READY"  # written last: a folder without it is a conversion cut short, redone
UNIVERSAL = "universal"


@dataclass(frozen=True)
class LoadableCopy:
    path: Path  # the folder `accelerator.load_state` reads
    universal: bool  # through DeepSpeed's universal loader (ZeRO 1-3), or natively (ZeRO-0)


def universal_cache_dir(ckpt: Path) -> Path:
    return ckpt.parent / ".universal" / ckpt.name


def needs_conversion(meta: dict[str, Any], world_size: int, stage: int) -> bool:
    """Written by another world size or at another stage; ZeRO-0's files are the same on any world size."""
    written = (meta["world_size"], meta["zero_stage"])
    return written != (world_size, stage) and written[1] + stage > 0


def convert_for(ckpt: Path, meta: dict[str, Any], world_size: int, stage: int, precision: str) -> LoadableCopy:
    """The copy of `ckpt` that `world_size` ranks at ZeRO-`stage` load (rank 0 only; cached)."""
    universal = _cached(universal_cache_dir(ckpt) / UNIVERSAL, lambda out: _to_universal(ckpt, meta, out))
    target = f"ws{world_size}-z{stage}"
    if stage == 0:
        path = _cached(universal.parent / target,
                       lambda out: universal_to_stage0(universal / DS_TAG, _tag_dir(out), precision))
    else:
        path = _cached(universal.parent / target, lambda out: _link_for_stage(universal / DS_TAG, out, world_size, stage))
    copy_rng_states(ckpt, path)  # idempotent: the ranks that existed before keep their RNG streams
    return LoadableCopy(path, universal=stage != 0)


def _cached(out: Path, build: Callable[[Path], None]) -> Path:
    """`out`, built once by `build(folder)` into a temporary folder renamed into place when complete."""
    if (out / READY).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # cut short, or of an older layout
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        build(tmp)
        (tmp / READY).write_text("ok\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tag_dir(folder: Path) -> Path:
    (folder / DS_TAG).mkdir(exist_ok=True)
    return folder / DS_TAG


def _to_universal(ckpt: Path, meta: dict[str, Any], out: Path) -> None:
    log.info("converting %s (ZeRO-%d on %d rank(s)) to a universal checkpoint", ckpt.name, meta["zero_stage"],
             meta["world_size"])
    if meta["zero_stage"] == 0:
        stage0_to_universal(ckpt / DS_TAG, _tag_dir(out), _stage0_shapes(ckpt, meta))
        return
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / DS_TAG),
               "--output_folder", str(out / DS_TAG), "--num_extract_workers", "2", "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserInputError(f"checkpoint {ckpt}: DeepSpeed's universal conversion failed ({tail}); resume on the "
                             "world size and ZeRO stage it was written with")
    normalize(out / DS_TAG, param_shapes(out / DS_TAG))


def _stage0_shapes(ckpt: Path, meta: dict[str, Any]):
    """ZeRO-0's model-states file records no parameter groups; the checkpoint's metadata names them."""
    import torch

    if "param_groups" not in meta:
        raise UserInputError(f"checkpoint {ckpt}: written at ZeRO-0 by an older version that did not record its "
                             "parameter groups; resume it at ZeRO-0")
    module = torch.load(ckpt / DS_TAG / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    return [{name: module[name].shape for name in group} for group in meta["param_groups"]]


def _link_for_stage(universal_tag: Path, out: Path, world_size: int, stage: int) -> None:
    """The model-state names `stage` opens (they carry shapes and client state; the weights and optimizer
    states are read from `zero/`), and `zero/` itself as a link to the shared universal folder."""
    tag = _tag_dir(out)
    source = next(iter(sorted(universal_tag.glob("*model_states.pt"))), None)
    if source is None:
        raise UserInputError(f"universal checkpoint {universal_tag}: no model states file; the conversion is incomplete")
    wanted = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if stage == 3
              else [MODEL_STATES])
    for name in wanted:
        shutil.copy2(source, tag / name)
    (tag / "zero").symlink_to(os.path.relpath(universal_tag / "zero", tag))
