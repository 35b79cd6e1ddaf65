"""What makes a checkpoint trustworthy: its metadata file, per-file checksums, atomic file writes.

A checkpoint directory is complete only when `bigmodel_meta.json` exists, parses, is of a format this
code reads, and every file it lists has its size and checksum. The metadata is written last, inside a
temporary directory that is then renamed: a directory without it is never chosen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bigmodel_dist.core.fileio import file_checksum, fsync_path

CHECKPOINT_FORMAT_VERSION = 2  # 2: the training state is one block, `train_state` (1: flat keys)
META_NAME = "bigmodel_meta.json"
DS_TAG = "pytorch_model"  # the sub-folder Accelerate's save_state gives the DeepSpeed engine's files
STEP_PREFIX = "step_"
PARTIAL_PREFIX = ".partial-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def name_in(ckpt_dir: Path, path: str | Path) -> str:
    """`path`'s name relative to `ckpt_dir`, whichever of the two is relative or absolute (DeepSpeed
    hands checkpoint engines the paths it was given, in their form)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(ckpt_dir))


def list_files(ckpt_dir: Path) -> list[str]:
    """Every file under the checkpoint except the metadata itself, as sorted relative paths."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file() and p.name != META_NAME)


def describe_files(ckpt_dir: Path, relative: list[str]) -> dict[str, dict[str, Any]]:
    """fsync and checksum `relative` files (one rank's share of them)."""
    described = {}
    for rel in relative:
        path = ckpt_dir / rel
        fsync_path(path)
        described[rel] = {"size": path.stat().st_size, "xxh3_128": file_checksum(path)}
    return described


def check_files(ckpt_dir: Path, expected: dict[str, dict[str, Any]], relative: list[str], with_checksums: bool = True) -> str | None:
    """The first problem among `relative` listed files, or None when they match the metadata."""
    for rel in relative:
        path = ckpt_dir / rel
        want = expected[rel]
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has {path.stat().st_size} bytes, metadata says {want['size']} (truncated?)"
        if with_checksums and file_checksum(path) != want["xxh3_128"]:
            return f"{rel} fails its checksum (altered or corrupted)"
    return None


def read_checkpoint_meta(ckpt_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, None) or (None, why it is unusable)."""
    path = ckpt_dir / META_NAME
    if not path.is_file():
        return None, f"no {META_NAME} (an incomplete save?)"
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        return None, f"{META_NAME} is not valid JSON"
    if not isinstance(meta, dict) or "files" not in meta or "step" not in meta:
        return None, f"{META_NAME} lacks its files/step entries"
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        return None, f"format {meta['format_version']} is newer than this bigmodel-dist reads ({CHECKPOINT_FORMAT_VERSION}); upgrade"
    return meta, None






def step_dirs(checkpoints: Path) -> list[Path]:
    """Committed-looking step directories, newest first (partials are never listed)."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)
