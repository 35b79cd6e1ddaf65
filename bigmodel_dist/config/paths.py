"""Every user-given path of a Config made absolute once, against the directory the command was run in.

The policy, for every launcher: a relative path means "relative to where you ran the command". It is
resolved where the config is loaded (`load_config`), so everything downstream (savers, markers, metrics,
launchers, Ray workers with another working directory, nodes whose shells start elsewhere) sees one
absolute path and never re-roots it. Words that are not paths keep their meaning: `python-stdlib`, a
shipped DeepSpeed name (`zero2`), `latest`/`none`, a hub tokenizer name with no such local folder, a URL.
Symlinks are kept (no `resolve()`): a path through a link means what the user typed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from bigmodel_dist.config.schema import Config, DataConfig, SourceConfig

PYTHON_STDLIB = "python-stdlib"  # data.paths entry: this interpreter's standard library, not a path
RESUME_WORDS = ("latest", "none")


def absolute_path(path: str, base: Path) -> str:
    """`path` (with `~` expanded) joined to `base` when relative, normalised; never follows links."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def with_absolute_paths(cfg: Config, base: Path) -> Config:
    """`cfg` with output_dir, data folders and files, the tokenizer folder, checkpoint.resume,
    deepspeed.config and ray.storage_path absolute against `base` (idempotent)."""
    base = Path(os.path.abspath(base))
    ray = cfg.ray
    if ray.storage_path and "://" not in ray.storage_path:
        ray = dataclasses.replace(ray, storage_path=absolute_path(ray.storage_path, base))
    resume = cfg.checkpoint.resume
    if resume not in RESUME_WORDS:
        resume = absolute_path(resume, base)
    return dataclasses.replace(
        cfg,
        output_dir=absolute_path(cfg.output_dir, base),
        data=_data_paths(cfg.data, base),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume=resume),
        deepspeed=dataclasses.replace(cfg.deepspeed, config=deepspeed_json_path(cfg.deepspeed.config, base)),
        ray=ray,
    )


def is_shipped_deepspeed_name(name_or_path: str) -> bool:
    """`zero2` names a shipped DeepSpeed JSON; `my.json` or `dir/x` is a path."""
    return Path(name_or_path).suffix != ".json" and "/" not in name_or_path


def deepspeed_json_path(name_or_path: str, base: Path) -> str:
    return name_or_path if is_shipped_deepspeed_name(name_or_path) else absolute_path(name_or_path, base)


def _data_paths(data: DataConfig, base: Path) -> DataConfig:
    def optional(path: str | None) -> str | None:
        return None if path is None else absolute_path(path, base)

    return dataclasses.replace(
        data,
        paths=_corpus_paths(data.paths, base),
        sources=[_source_paths(source, base) for source in data.sources],
        tokenizer=_tokenizer_path(data.tokenizer, base),
        cache_dir=optional(data.cache_dir),
        prepared_dir=optional(data.prepared_dir),
    )


def _source_paths(source: SourceConfig, base: Path) -> SourceConfig:
    return dataclasses.replace(source, paths=_corpus_paths(source.paths, base))


def _corpus_paths(paths: list[str], base: Path) -> list[str]:
    return [entry if entry == PYTHON_STDLIB else absolute_path(entry, base) for entry in paths]


def _tokenizer_path(tokenizer: str | None, base: Path) -> str | None:
    """A local folder (as transformers looks first) is made absolute; a hub name that names no local
    folder (`gpt2`, `org/name`) is left for `from_pretrained`."""
    if tokenizer is None:
        return None
    looks_local = tokenizer.startswith(("/", "./", "../", "~")) or tokenizer in (".", "..")
    local = absolute_path(tokenizer, base)
    return local if looks_local or os.path.exists(local) else tokenizer


def output_paths(cfg: Config) -> dict[str, str]:
    """The folders a run writes to, by field (those that are set): on a cluster they must be on storage
    every node sees, and they must outlive the job."""
    fields = {"output_dir": cfg.output_dir, "data.cache_dir": cfg.data.cache_dir,
              "data.prepared_dir": cfg.data.prepared_dir, "ray.storage_path": cfg.ray.storage_path}
    return {name: value for name, value in fields.items() if value and "://" not in value}
