"""Tokenise a corpus and pack it into memory-mapped token shards (`bigmodel prepare`, or on first train).

Layout of a prepared folder:
    meta.json            format version, tokenizer + source fingerprints, seq_len, dtype, counts, shards
    tokenizer/           the tokenizer the ids came from (saved with the data, used by export)
    shard-00000.bin      (num_sequences, seq_len) tokens, raw little-endian uint16/uint32
    shard-00000.json     the shard's key, counts and checksum: written after its .bin, so a shard
                         without one is incomplete and is redone; a complete one is skipped on rerun
Documents are joined with EOS and packed into fixed-length sequences per shard (a shard's last partial
sequence is dropped); the last `val_fraction` of each shard's sequences is the validation split.
Every file is written to a temp name, fsynced and renamed: a killed run leaves nothing later trusted.

Three steps (bigmodel_dist/data/prepare_plan.py): plan (identity, tokenizer, folder, shard count), write
shard i (idempotent), finalize (meta.json once every shard is complete). `prepare_data` runs them all
here; `plans_for_run` hands the plans to a cluster engine (`bigmodel prepare --on ray`, slurm/prepare.sh),
whose tasks write the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bigmodel_dist.config.inputs import check_input_files, input_files, sources_here
from bigmodel_dist.config.schema import Config, DataConfig
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.run_dir import CACHE_DIR_NAME
from bigmodel_dist.data.prepare_plan import DOCS_PER_BATCH, Plan, ShardWriter, finalize, stable_hash
from bigmodel_dist.data.sources import load_text_dataset, source_fingerprint
from bigmodel_dist.data.tokenizer import (
    load_tokenizer,
    save_tokenizer_atomically,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

log = logging.getLogger(__name__)

PREPARED_FORMAT_VERSION = 1
__all__ = ["DOCS_PER_BATCH", "PREPARED_FORMAT_VERSION", "Plan", "cache_dir_of", "check_compatible", "plans_for_run",
           "prepare_data", "prepare_for_run", "read_prepared_meta"]


def cache_dir_of(data_cfg: DataConfig, output_dir: str) -> Path:
    """Where derived data (tokenizer, HF dataset cache, prepared shards) lives: `data.cache_dir` or
    `<output_dir>/.cache`."""
    return Path(os.path.abspath(data_cfg.cache_dir or Path(output_dir) / CACHE_DIR_NAME))


def prepare_for_run(config: Config, vocab_size: int, progress: bool = True) -> Path:
    """The prepared folder of a run config (`Config`): what `bigmodel prepare`, the launchers and every
    rank call, so all of them find the same folder."""
    return prepare_data(config.data, vocab_size, cache_dir_of(config.data, config.output_dir), progress=progress)


def prepare_data(data_cfg: DataConfig, model_vocab_size: int, cache_dir: Path, progress: bool = True) -> Path:
    """The prepared folder for this data config, built (or completed) if needed. Idempotent."""
    planned = _plan(data_cfg, model_vocab_size, cache_dir)
    if planned.plan is None:
        return planned.out
    writer = ShardWriter(planned.plan, dataset=planned.dataset, backend=planned.tokenizer.backend_tokenizer)
    for index in _progress(range(planned.plan.num_shards), progress, "prepare"):
        writer.write(index)
    finalize(planned.plan)
    return planned.out


def plans_for_run(config: Config, vocab_size: int) -> list[Plan]:
    """What is left to prepare for a run config, as plans a cluster engine can carry out (one per
    prepared folder; none when every folder is complete). Planning trains or loads the tokenizer, saves
    it into each folder and counts the shards; it writes no shard."""
    if config.data.sources:  # a mixture plans each source with its shared tokenizer
        raise ValueError("plans_for_run is for one pool; mixture_sources.run_plans plans a mixture's sources")
    plan = plan_data(config.data, vocab_size, cache_dir_of(config.data, config.output_dir))
    return [plan] if plan is not None else []


def plan_data(data_cfg: DataConfig, model_vocab_size: int, cache_dir: Path) -> Plan | None:
    """The plan of one prepared folder, or None when it is complete."""
    return _plan(data_cfg, model_vocab_size, cache_dir).plan


class _Planned(NamedTuple):
    out: Path
    plan: Plan | None  # None: the folder is complete
    dataset: _Lazy | None = None
    tokenizer: Any = None


def _plan(data_cfg: DataConfig, model_vocab_size: int, cache_dir: Path) -> _Planned:
    if data_cfg.num_proc:  # tokenizers' Rust pool reads this once, at its first parallel call
        os.environ["RAYON_NUM_THREADS"] = str(data_cfg.num_proc)
    if data_cfg.prepared_dir and (Path(data_cfg.prepared_dir) / "meta.json").is_file():
        return _Planned(_reuse_prepared(Path(data_cfg.prepared_dir), data_cfg, model_vocab_size), None)
    # Absolute: the documents' `datasets` cache is keyed by these paths, and a cluster task that reloads
    # them from another working directory must hit the cache the planner built.
    files = [] if data_cfg.dataset else [path.resolve() for path in input_files(data_cfg)]
    check_input_files(files, data_cfg)
    source_fp = source_fingerprint(files, data_cfg)
    dataset = _Lazy(lambda: load_text_dataset(data_cfg, files, cache_dir, source_fp))
    tokenizer = _obtain_tokenizer(data_cfg, dataset, model_vocab_size, cache_dir, source_fp)
    dtype = _token_dtype(data_cfg, len(tokenizer))
    identity = {
        "format_version": PREPARED_FORMAT_VERSION,
        "source_fingerprint": source_fp,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seq_len": data_cfg.seq_len,
        "val_fraction": data_cfg.val_fraction,
        "dtype": np.dtype(dtype).name,
    }
    out = Path(data_cfg.prepared_dir) if data_cfg.prepared_dir else cache_dir / f"prepared-{stable_hash(identity)}"
    if (out / "meta.json").is_file():  # a derived folder's name is its identity
        return _Planned(out, None)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        save_tokenizer_atomically(tokenizer, out / "tokenizer")
    plan = Plan(out=str(out.resolve()), identity=identity,
                num_shards=max(1, math.ceil(dataset().data.nbytes / data_cfg.shard_bytes)),
                data=dataclasses.asdict(data_cfg), files=[str(f) for f in files], cache_dir=str(cache_dir.resolve()),
                tokenizer_json=tokenizer.backend_tokenizer.to_str(), eos_token_id=tokenizer.eos_token_id,
                tokenizer_vocab_size=len(tokenizer))
    return _Planned(out, plan, dataset, tokenizer)


def _reuse_prepared(prepared: Path, data_cfg: DataConfig, model_vocab_size: int) -> Path:
    """An explicit, complete prepared folder: check it against what the config asks, never rebuild it."""
    wanted: dict[str, Any] = {"seq_len": data_cfg.seq_len, "val_fraction": data_cfg.val_fraction}
    if data_cfg.tokenizer is not None:
        wanted["tokenizer_fingerprint"] = tokenizer_fingerprint(load_tokenizer(data_cfg.tokenizer))
    if sources_here(data_cfg):  # data prepared on another machine may not have its sources here
        wanted["source_fingerprint"] = source_fingerprint(input_files(data_cfg), data_cfg)
    meta = read_prepared_meta(prepared)
    check_compatible(meta, wanted, prepared)
    if meta["tokenizer_vocab_size"] > model_vocab_size:
        raise UserInputError(f"prepared data {prepared / 'meta.json'}: its tokenizer has {meta['tokenizer_vocab_size']} "
                             f"tokens, more than the model's vocabulary of {model_vocab_size}; raise model.vocab_size")
    return prepared


class _Lazy:
    """Load the corpus only when something needs it (a cached tokenizer and complete data do not)."""

    def __init__(self, load):
        self._load, self._value = load, None

    def __call__(self):
        if self._value is None:
            self._value = self._load()
        return self._value


def read_prepared_meta(prepared: Path) -> dict[str, Any]:
    path = prepared / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserInputError(f"prepared data {path}: missing or unreadable; run `bigmodel prepare` again") from None
    if meta.get("format_version", 0) > PREPARED_FORMAT_VERSION:
        raise UserInputError(f"prepared data {path}: format {meta['format_version']} is newer than this bigmodel "
                             f"(reads {PREPARED_FORMAT_VERSION}); upgrade bigmodel-dist")
    return meta


def check_compatible(meta: dict[str, Any], wanted: dict[str, Any], prepared: Path) -> None:
    """Refuse (never overwrite) prepared data made for another tokenizer, length or corpus."""
    fixes = {"tokenizer_fingerprint": "data.tokenizer", "seq_len": "data.seq_len", "source_fingerprint": "data.paths",
             "val_fraction": "data.val_fraction", "dtype": "data.token_dtype"}
    for field, config_field in fixes.items():
        if field in wanted and meta.get(field) != wanted[field]:
            raise UserInputError(
                f"prepared data {prepared / 'meta.json'}: made with {field}={meta.get(field)!r}, the config asks "
                f"{wanted[field]!r}; set data.prepared_dir to a new folder (or match {config_field})"
            )




def _obtain_tokenizer(data_cfg: DataConfig, dataset: _Lazy, vocab_size: int, cache_dir: Path, source_fp: str):
    folder = None
    if data_cfg.tokenizer is not None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    else:
        folder = cache_dir / f"tokenizer-bpe{vocab_size}-{source_fp}"
        if (folder / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(folder)
        else:
            log.info("training a byte-level BPE tokenizer (vocab %d) on the corpus", vocab_size)
            texts = (batch["text"] for batch in dataset().iter(batch_size=DOCS_PER_BATCH))
            tokenizer = train_bpe_tokenizer(texts, vocab_size, folder)
    if len(tokenizer) > vocab_size:
        name = data_cfg.tokenizer or f"trained on the corpus ({folder})"
        raise UserInputError(f"tokenizer {name}: {len(tokenizer)} tokens do not fit the model's "
                             f"vocabulary of {vocab_size}; raise model.vocab_size")
    return tokenizer


def _token_dtype(data_cfg: DataConfig, vocab: int) -> type:
    fits16 = vocab <= np.iinfo(np.uint16).max + 1
    if data_cfg.token_dtype == "uint16" and not fits16:
        raise UserInputError(f"data.token_dtype: uint16 holds 65536 ids but the tokenizer has {vocab}; use uint32 or auto")
    if data_cfg.token_dtype == "auto":
        return np.uint16 if fits16 else np.uint32
    return np.dtype(data_cfg.token_dtype).type


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="shard", disable=None, file=sys.stderr)
