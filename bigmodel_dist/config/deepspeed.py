"""The DeepSpeed JSON: find it, load it, fill what the training config decides.

`resolve_deepspeed_config` fills every field the training config owns (batch sizes from the
`BatchLayout`, clipping, precision, optimizer, hidden-size buckets) into a user's JSON: "auto" or absent
values are filled, equal values pass, and a different concrete value is an error naming both, so the
JSON and the YAML can never silently disagree.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from bigmodel_dist.config.layout import BatchLayout
from bigmodel_dist.config.paths import is_shipped_deepspeed_name
from bigmodel_dist.config.schema import Config
from bigmodel_dist.core.errors import ConfigError, UserInputError

# configs/deepspeed/ of the repository, reached through a link inside the package so that a wheel
# (pip install ., the Docker image) ships the named configs as package data.
SHIPPED_DEEPSPEED_DIR = Path(__file__).parent / "shipped_deepspeed"


def locate_deepspeed_json(name_or_path: str) -> Path:
    """A shipped name (zero2) or a path to a user's JSON."""
    candidate = Path(name_or_path)
    if is_shipped_deepspeed_name(name_or_path):
        candidate = SHIPPED_DEEPSPEED_DIR / f"{name_or_path}.json"
    if not candidate.is_file():
        shipped = sorted(p.stem for p in SHIPPED_DEEPSPEED_DIR.glob("*.json"))
        raise ConfigError("deepspeed.config", f"{name_or_path}: no such DeepSpeed JSON; give a path or one of {shipped}")
    return candidate


def load_deepspeed_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"DeepSpeed config {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"DeepSpeed config {path}: top level must be a JSON object")
    return data


def zero_stage_of(ds: dict[str, Any], source: Path) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserInputError(f"DeepSpeed config {source}: zero_optimization.stage must be 0-3, got {stage!r}")
    return stage


def resolve_deepspeed_config(
    cfg: Config, layout: BatchLayout, hidden_size: int, source: Path, has_cuda: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed config DeepSpeed will run with, plus notes for the log (what was dropped)."""
    ds = copy.deepcopy(load_deepspeed_json(source))
    notes: list[str] = []
    if cfg.deepspeed.zero_stage is not None:  # an explicit override beats the JSON
        ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    zero_stage_of(ds, source)
    if "scheduler" in ds:
        del ds["scheduler"]
        notes.append(f"{source}: dropped its 'scheduler' block; the trainer owns the LR schedule (optim.*)")
    if ds.get("optimizer", {}).get("type", "AdamW").lower() not in ("adam", "adamw"):
        raise UserInputError(f"DeepSpeed config {source}: optimizer.type must be Adam or AdamW (or drop the block)")

    owned = {
        "train_batch_size": ("train.global_batch_size", layout.global_batch_size),
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", layout.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", layout.grad_accum_steps),
        "gradient_clipping": ("train.grad_clip", cfg.train.grad_clip),
        "bf16.enabled": ("train.precision", cfg.train.precision == "bf16"),
        "fp16.enabled": ("train.precision", cfg.train.precision == "fp16"),
        "optimizer.type": ("optim", ds.get("optimizer", {}).get("type", "AdamW")),
        "optimizer.params.lr": ("optim.lr", cfg.optim.lr),
        "optimizer.params.betas": ("optim.beta1/beta2", [cfg.optim.beta1, cfg.optim.beta2]),
        "optimizer.params.eps": ("optim.eps", cfg.optim.eps),
        "optimizer.params.weight_decay": ("optim.weight_decay", cfg.optim.weight_decay),
    }
    for dotted, (field, value) in owned.items():
        _fill(ds, dotted, value, field, source)

    # Same rule as Accelerate/HF Trainer for buckets that scale with the model width.
    zero = ds["zero_optimization"]
    by_hidden = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in by_hidden.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for block in ("offload_optimizer", "offload_param"):
        if zero.get(block, {}).get("pin_memory") == "auto":
            zero[block]["pin_memory"] = has_cuda  # pinned host memory needs a GPU driver
    offloaded = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if not has_cuda and not offloaded and "optimizer" in ds:
        # Without a GPU, DeepSpeed's Adam is a JIT-built C++ op (~90 s to compile on a fresh machine, and
        # an op load plus a CPU probe in every process); torch's fused CPU AdamW does the same update.
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
        ds["optimizer"]["params"].setdefault("fused", True)

    refuse_checkpoint_writer(ds, source)
    leftover = _find_auto(ds)
    if leftover:
        raise UserInputError(
            f"DeepSpeed config {source}: {leftover} is \"auto\" but nothing in the run config decides it; set a value"
        )
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise UserInputError(f"DeepSpeed config {source}: bf16 and fp16 are both enabled; keep one")
    return ds, notes


def refuse_checkpoint_writer(ds: dict[str, Any], source: Path) -> None:
    """A `checkpoint.writer` block would pick DeepSpeed's FastPersist engines, which in DeepSpeed 0.19 do
    not write a complete checkpoint of a pure data-parallel run (measured on 0.19.8: without `data_parallel` they
    fail on a missing dp_rank, `machine`/`socket` skip the other ranks' optimizer shards, `replica` makes
    every rank write the model file), and `decoupled` commits after the save returns. bigmodel's own writer
    (parallel, fsynced, checksummed while written) is what runs; `checkpoint.async_save` is the async path."""
    if ds.get("checkpoint", {}).get("writer") is not None:
        raise UserInputError(f"DeepSpeed config {source}: checkpoint.writer is not supported (DeepSpeed's FastPersist "
                             "engines do not save a complete data-parallel checkpoint); drop the block: bigmodel writes "
                             "checkpoints in parallel and durably itself, and checkpoint.async_save: true writes in the background")


def check_offload_paths(ds: dict[str, Any], source: Path) -> None:
    """NVMe offload needs a writable folder on every node; fail before any process group starts."""
    for block in ("offload_optimizer", "offload_param"):
        spec = ds.get("zero_optimization", {}).get(block, {})
        if spec.get("device") != "nvme":
            continue
        nvme_path = spec.get("nvme_path")
        if not nvme_path:
            raise UserInputError(f"DeepSpeed config {source}: zero_optimization.{block}.nvme_path is missing")
        path = Path(nvme_path)
        if not path.is_absolute():  # each rank would resolve it in its own working directory
            raise UserInputError(f"DeepSpeed config {source}: zero_optimization.{block}.nvme_path {nvme_path} is "
                                 "relative; give an absolute path to a local NVMe folder")
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserInputError(
                f"DeepSpeed config {source}: zero_optimization.{block}.nvme_path {nvme_path} is not writable; "
                "point it at a writable local NVMe folder"
            )


def _fill(ds: dict[str, Any], dotted: str, value: Any, field: str, source: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for key in parents:
        node = node.setdefault(key, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif _differs(current, value):
        raise UserInputError(
            f"DeepSpeed config {source}: {dotted}={json.dumps(current)} conflicts with {field}={json.dumps(value)}; "
            f"set it to \"auto\" (or drop it) so the run config decides"
        )


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() != b.lower()
    return a != b


def _find_auto(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None
