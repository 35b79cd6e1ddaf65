"""Pre-flight: everything a run needs, checked and derived once, before any process group starts.

`resolve_run` turns a Config plus a world size into a `ResolvedRun`: batch layout, the DeepSpeed config
DeepSpeed will get, model size and the figures `bigmodel validate` prints. It touches the file system
only to read and to check writability; it writes nothing. The device (for `train.precision: auto` and
pinned memory) is passed in; only when it is not does this ask torch about the machine it runs on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel_dist.config.deepspeed import (
    check_offload_paths,
    locate_deepspeed_json,
    resolve_deepspeed_config,
)
from bigmodel_dist.config.inputs import check_input_files, input_files, source_data_config
from bigmodel_dist.config.layout import BatchLayout, derive_batch_layout
from bigmodel_dist.config.presets import ModelShape, count_parameters, model_shape
from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import ConfigError, UserInputError
from bigmodel_dist.core.run_dir import RunDir
from bigmodel_dist.run.precision import DeviceInfo, choose_precision, detect_device


@dataclass(frozen=True)
class ResolvedRun:
    config: Config
    run_dir: RunDir
    layout: BatchLayout
    deepspeed_source: Path
    deepspeed_config: dict[str, Any]
    deepspeed_notes: list[str]
    shape: ModelShape
    num_parameters: int
    precision_reason: str = "set in the config"  # why config.train.precision is what it is ("auto" resolved)

    @property
    def zero_stage(self) -> int:
        return self.deepspeed_config["zero_optimization"]["stage"]

    @property
    def tokens_per_step(self) -> int:
        return self.layout.tokens_per_step(self.config.data.seq_len)

    def model_state_bytes_per_rank(self) -> dict[str, float]:
        return model_state_bytes_per_rank(
            self.num_parameters, self.zero_stage, self.config.train.precision, self.layout.data_parallel_size
        )


def run_dir_of(cfg: Config) -> RunDir:
    """Where a run keeps its config, metrics, checkpoints and markers: `<output_dir>/<name>`, absolute."""
    return RunDir.at(cfg.output_dir, cfg.name)


def resolve_run(cfg: Config, world_size: int, device: DeviceInfo | None = None) -> ResolvedRun:
    """Check and derive everything for a run on `world_size` data-parallel ranks of `device` (default:
    this machine's). The returned config holds a concrete precision, never "auto"."""
    if world_size < 1:
        raise ConfigError("world size", f"must be >= 1, got {world_size}")
    device = device or detect_device()
    precision, precision_reason = choose_precision(cfg.train.precision, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    if cfg.model.vocab_size is not None:  # padded here, so the model, checks and checkpoints all see one size
        padded = -(-cfg.model.vocab_size // cfg.model.vocab_multiple) * cfg.model.vocab_multiple
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    layout = derive_batch_layout(cfg.train, world_size)
    shape = model_shape(cfg.model.preset, cfg.model.vocab_size)
    if cfg.data.seq_len > shape.max_positions:
        raise ConfigError(
            "data.seq_len", f"{cfg.data.seq_len} exceeds the {cfg.model.preset} context of {shape.max_positions} tokens"
        )
    source = locate_deepspeed_json(cfg.deepspeed.config)
    ds, notes = resolve_deepspeed_config(cfg, layout, shape.hidden_size, source, has_cuda=device.has_cuda)
    check_offload_paths(ds, source)
    _check_data_paths(cfg)
    _check_tokenizer_fits(cfg, shape.vocab_size)
    _check_resume_path(cfg.checkpoint.resume)
    if cfg.resilience.enabled:
        _check_save_timeout(cfg, count_parameters(shape), world_size)
    run_dir = run_dir_of(cfg)
    _check_writable(run_dir.path, "output_dir")
    return ResolvedRun(cfg, run_dir, layout, source, ds, notes, shape, count_parameters(shape), precision_reason)


# For the save-timeout check: a checkpoint holds fp32 weights and two Adam moments (12 bytes/parameter),
# written by up to 8 ranks per node at a modest 0.5 GB/s per node. Pessimistic on purpose.
CHECKPOINT_BYTES_PER_PARAMETER = 12
RANKS_PER_NODE_ASSUMED = 8
NODE_WRITE_BYTES_PER_S = 0.5e9


def estimated_save_s(num_params: int, world_size: int) -> float:
    nodes = max(1.0, world_size / RANKS_PER_NODE_ASSUMED)
    return CHECKPOINT_BYTES_PER_PARAMETER * num_params / nodes / NODE_WRITE_BYTES_PER_S


def _check_save_timeout(cfg: Config, num_params: int, world_size: int) -> None:
    """The watchdog must not call a long save a hang."""
    estimate = estimated_save_s(num_params, world_size)
    if cfg.resilience.save_timeout_s < estimate:
        raise ConfigError("resilience.save_timeout_s", f"{cfg.resilience.save_timeout_s:g}s is shorter than a checkpoint "
                          f"save of this model is estimated to take ({estimate:.0f}s at 0.5 GB/s per node); raise it")


def model_state_bytes_per_rank(num_params: int, zero_stage: int, precision: str, dp: int) -> dict[str, float]:
    """Params, grads and optimizer bytes per rank without offload (see `bigmodel_dist.run.planner`)."""
    from bigmodel_dist.run.planner import Variant, model_states

    states, _ = model_states(num_params, Variant(zero_stage), precision, dp)
    return {**states, "total": sum(states.values())}


def _check_data_paths(cfg: Config) -> None:
    prepared = cfg.data.prepared_dir
    if cfg.data.sources:
        _check_source_paths(cfg)
    elif not cfg.data.dataset and not (prepared and Path(prepared, "meta.json").is_file()):
        check_input_files(input_files(cfg.data), cfg.data)  # prepared data is checked when it is opened
    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer, "tokenizer.json").is_file():
        raise ConfigError(
            "data.tokenizer", f"{cfg.data.tokenizer} holds no tokenizer.json; give a saved fast tokenizer folder or null"
        )


def _check_source_paths(cfg: Config) -> None:
    """Every mixture source's files, each error naming its `data.sources[i]` field."""
    for i, source in enumerate(cfg.data.sources):
        if source.dataset:
            continue
        source_cfg = source_data_config(cfg.data, source, None)
        try:
            check_input_files(input_files(source_cfg), source_cfg)
        except UserInputError as exc:
            raise UserInputError(f"data.sources[{i}] ({source.name}): {str(exc).replace('data.paths', 'paths')}") from None


def _check_writable(path: Path, field: str) -> None:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(field, f"{existing} is not a writable folder; choose an output_dir you can write to")


# A byte-level BPE holds the 256 byte tokens plus the end-of-text token before it learns any merge.
MIN_BPE_VOCAB = 257


def _check_tokenizer_fits(cfg: Config, vocab_size: int) -> None:
    """Every id the tokenizer can produce must be an embedding row of the model."""
    if cfg.data.tokenizer is None:
        if vocab_size < MIN_BPE_VOCAB:
            raise ConfigError("model.vocab_size", f"{vocab_size} is too small for the byte-level BPE trained on the "
                                                  f"corpus (256 bytes + end-of-text); use at least {MIN_BPE_VOCAB}")
        return
    tokens = tokenizer_json_size(Path(cfg.data.tokenizer, "tokenizer.json"))
    if tokens > vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab_size} is smaller than the {tokens} tokens of data.tokenizer "
                                              f"{cfg.data.tokenizer}; raise it to at least {tokens} (or drop it)")


def tokenizer_json_size(path: Path) -> int:
    """Tokens of a fast tokenizer's tokenizer.json (vocabulary plus added tokens), without loading it."""
    import json

    try:
        spec = json.loads(path.read_text())
        ids = set(spec["model"]["vocab"].values()) | {token["id"] for token in spec.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError("data.tokenizer", f"{path} is not a readable fast-tokenizer file; save the tokenizer with "
                                            "save_pretrained() into that folder") from None
    return max(ids) + 1 if ids else 0


def _check_resume_path(resume: str) -> None:
    if resume in ("latest", "none"):
        return
    if not Path(resume, "bigmodel_meta.json").is_file():
        what = "does not exist" if not Path(resume).exists() else "is not a committed checkpoint (no bigmodel_meta.json)"
        raise ConfigError("checkpoint.resume", f"{resume} {what}; give a step folder such as "
                                               "runs/NAME/checkpoints/step_00000100, latest or none")
