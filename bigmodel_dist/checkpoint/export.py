"""Export a checkpoint as a Hugging Face folder: safetensors weights, config.json, tokenizer files.

The fp32 weights are consolidated once (DeepSpeed's zero_to_fp32 for ZeRO 1-3, the module weights at
stage 0), assigned into a meta-device build of the architecture (which checks every name and shape) and
written shard by shard from those same tensors: one fp32 copy in memory, never two. `save_pretrained`
is not used because it clones weights that share storage, and ZeRO 1-2 weights are views of one flat
buffer. Files go to a hidden sibling folder renamed to OUT_DIR last: a killed export leaves nothing there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bigmodel_dist.checkpoint.integrity import DS_TAG, META_NAME, check_files, read_checkpoint_meta
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.fileio import fsync_path

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SHARD_BYTES = 2 * 2**30  # the progress bar advances per shard; 2 GiB files also move and upload easily


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str = "fp32", progress: bool = True) -> Path:
    """Write `checkpoint` as a Hugging Face folder at `out_dir`, which must be new or empty."""
    if dtype not in DTYPES:
        raise UserInputError(f"export dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    meta = _checked_meta(checkpoint)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserInputError(f"{out_dir} already exists and is not empty; pick a new output folder "
                             "(an export never overwrites)")
    from bigmodel_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint / "tokenizer")
    log.info("reading step %d (ZeRO-%d, %s, %d ranks) from %s", meta["step"], meta["zero_stage"],
             meta["precision"], meta["world_size"], checkpoint)
    model = _load_model(checkpoint, meta, tokenizer.eos_token_id)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export
    partial.mkdir(parents=True)
    try:
        _write_weights(model, partial, dtype, progress)
        model.config.dtype = DTYPES[dtype]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(partial)
        if model.can_generate():
            model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(str(partial))
        for path in [*partial.iterdir(), partial]:
            fsync_path(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out_dir)  # atomic; also replaces an empty OUT_DIR
    fsync_path(out_dir.parent)
    return out_dir


def _checked_meta(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's metadata, once every file it lists is there with its recorded size."""
    if not (checkpoint / META_NAME).is_file():
        found = f"no {META_NAME}" if checkpoint.is_dir() else "no such folder"
        raise UserInputError(f"{checkpoint} is not a bigmodel checkpoint ({found}); pass a step folder "
                             "such as runs/NAME/checkpoints/step_00000100")
    meta, problem = read_checkpoint_meta(checkpoint)
    if meta is None:
        raise UserInputError(f"checkpoint {checkpoint}: {problem}")
    # Sizes, not checksums: they catch missing and truncated files without reading every byte twice.
    problem = check_files(checkpoint, meta["files"], sorted(meta["files"]), with_checksums=False)
    if problem is not None:
        raise UserInputError(f"checkpoint {checkpoint}: {problem}; export another step")
    if not (checkpoint / "tokenizer").is_dir():  # saved before checkpoints carried their tokenizer
        raise UserInputError(f"checkpoint {checkpoint} has no tokenizer/ folder; copy the run's tokenizer there "
                             "(its data.tokenizer, or the tokenizer-* folder in its data.cache_dir)")
    return meta


def _load_model(checkpoint: Path, meta: dict[str, Any], eos_token_id: int | None):
    """The trained model on CPU: the fp32 weights assigned into a meta-device build of its architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigmodel_dist.config.schema import ModelConfig
    from bigmodel_dist.model.build import build_transformers_config

    model_cfg = ModelConfig(**meta["config"]["model"])
    config = build_transformers_config(model_cfg, eos_token_id)
    config.use_cache = True  # training switched the KV cache off; generation (and its config) wants it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints on stdout, which carries only our result
        weights = _unique(_fp32_weights(checkpoint))
    loaded = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # GPT-2's lm_head is wte: loaded once above, under whichever name came first
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing or loaded.unexpected_keys:
        raise UserInputError(f"checkpoint {checkpoint}: its weights do not fit preset {model_cfg.preset} (missing "
                             f"{missing[:3]}, unexpected {loaded.unexpected_keys[:3]}); was it written by another version?")
    return model.eval()


def _fp32_weights(checkpoint: Path) -> dict[str, Any]:
    """Every full weight as an fp32 CPU tensor, by name (the one copy this export holds)."""
    import torch

    ds_dir = checkpoint / DS_TAG
    if any(ds_dir.glob("*_optim_states.pt")):  # ZeRO 1-3: the fp32 masters are partitioned there
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    # Stage 0 writes no optimizer partitions, so the weights are the module's. Under bf16 these are the bf16
    # copies the model computed with: DeepSpeed's stage-0 bf16 optimizer keeps its fp32 masters flattened
    # per param group inside this same file (optimizer.fp32_groups_flat), with no names to split them by.
    # mmap: the optimizer state in this file is never read into memory. DeepSpeed pickles more than tensors.
    states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
    return {name: tensor.float() for name, tensor in _unique(states["module"]).items()}


def _unique(tensors: dict[str, Any]) -> dict[str, Any]:
    """Each tensor once, under its first name: tied weights are one tensor saved under two names."""
    seen: set[tuple] = set()
    unique = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def _write_weights(model, folder: Path, dtype: str, progress: bool) -> None:
    """model.safetensors, or numbered shards plus their index, converting one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = getattr(torch, DTYPES[dtype])
    tensors = _unique(model.state_dict())  # views of the loaded weights, not copies
    shards = _plan_shards({name: tensor.numel() * torch_dtype.itemsize for name, tensor in tensors.items()})
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    total = sum(tensor.numel() for tensor in tensors.values()) * torch_dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", file=sys.stderr,
              disable=not progress) as bar:
        for filename, names in zip(files, shards):
            shard = {name: tensors[name].to(torch_dtype).contiguous() for name in names}  # copies only for bf16
            save_file(shard, str(folder / filename), metadata={"format": "pt"})  # transformers requires "pt"
            bar.update(sum(tensor.nbytes for tensor in shard.values()))
    if len(shards) > 1:
        weight_map = {name: filename for filename, names in zip(files, shards) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _plan_shards(sizes: dict[str, int]) -> list[list[str]]:
    """Names in order, cut into groups of at most SHARD_BYTES (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, num_bytes in sizes.items():
        if shards[-1] and shard_bytes + num_bytes > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += num_bytes
    return shards
