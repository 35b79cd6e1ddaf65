"""Preparation as work any engine can run: a serialisable Plan, write shard i, finalize.

A Plan is what preparation decides before its shard loop: the folder's identity, the tokenizer, the
output folder and the number of shards. It travels as JSON with the tokenizer inside, so a Ray task or a
Slurm array task on another machine trains nothing and decides nothing: it reads its shards' documents
(`Plan.load_input`), tokenises and writes them. Writing shard i is idempotent: a complete shard (its
sidecar names the plan's key and its .bin has the promised size) is skipped, and every file lands by
atomic rename, so a killed writer leaves nothing later trusted and two writers of one shard write the
same bytes. `finalize` writes meta.json only when every shard is complete. The local path
(`prepare.prepare_data`), `bigmodel prepare --on ray` and `slurm/prepare.sh` all run these three steps,
so they write the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_dist.config.schema import DataConfig
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.fileio import file_checksum, write_bytes_atomically, write_json_atomically
from bigmodel_dist.data.sources import load_text_dataset

log = logging.getLogger(__name__)

DOCS_PER_BATCH = 512
# Text handed to the tokenizer at once. Its per-token output (ids, masks, token strings) is ~20x the
# text, so batches bounded by bytes, not by documents, keep peak memory flat whatever the documents' sizes.
ENCODE_BATCH_BYTES = 2**20
Unit = tuple[int, int]  # (index of a plan in a list of plans, shard index): one shard to write


def stable_hash(payload: dict[str, Any]) -> str:
    """16 hex digits of the payload's canonical JSON: folder names and shard keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    """One prepared folder to complete; plain data, so it crosses processes and machines as JSON."""

    out: str
    """The prepared folder (its tokenizer/ is already saved when the plan exists)."""
    identity: dict[str, Any]
    """Format version, source and tokenizer fingerprints, seq_len, val_fraction, dtype: keys every shard."""
    num_shards: int
    data: dict[str, Any]
    """The data config (`DataConfig` fields) the documents are read with."""
    files: list[str]
    """The input files, sorted, as the planner found them (empty for a hub dataset)."""
    cache_dir: str
    """Where the `datasets` cache of the documents lives (shared storage on a cluster)."""
    tokenizer_json: str
    """The tokenizer's full definition (`tokenizers` JSON): its hash is the tokenizer fingerprint."""
    eos_token_id: int
    tokenizer_vocab_size: int

    @property
    def folder(self) -> Path:
        return Path(self.out)

    def shard_key(self, index: int) -> str:
        return stable_hash({**self.identity, "shard": index, "num_shards": self.num_shards})

    def data_config(self) -> DataConfig:
        from bigmodel_dist.config.loader import from_dict

        return from_dict({"data": self.data}).data

    def load_input(self):
        """All documents as the planner saw them (a `datasets.Dataset`, column `text`); from the
        `datasets` cache when the planner built it there."""
        return load_text_dataset(self.data_config(), [Path(f) for f in self.files], Path(self.cache_dir),
                                 self.identity["source_fingerprint"])

    def load_backend(self):
        """The `tokenizers.Tokenizer` of the plan, checked against the fingerprint it was planned with."""
        from tokenizers import Tokenizer

        if hashlib.sha256(self.tokenizer_json.encode()).hexdigest()[:16] != self.identity["tokenizer_fingerprint"]:
            raise UserInputError(f"prepare plan for {self.out}: its tokenizer does not match its fingerprint "
                                 f"{self.identity['tokenizer_fingerprint']}; plan again (bigmodel prepare)")
        return Tokenizer.from_str(self.tokenizer_json)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def existing_shard(plan: Plan, index: int) -> dict[str, Any] | None:
    """Shard `index`'s sidecar if the shard is complete for this plan, else None (to be written)."""
    sidecar = plan.folder / f"shard-{index:05d}.json"
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    data = plan.folder / info.get("file", "")
    if info.get("key") != plan.shard_key(index) or not data.is_file() or data.stat().st_size != info.get("num_bytes"):
        return None
    return info


class ShardWriter:
    """Writes a plan's shards in this process. The documents and the tokenizer are loaded on the first
    shard that needs writing (a process whose shards are all complete loads neither), or given by a
    caller that has them already."""

    def __init__(self, plan: Plan, dataset: Callable[[], Any] | None = None, backend: Any = None):
        self.plan = plan
        self._dataset = dataset
        self._backend = backend

    def write(self, index: int) -> dict[str, Any]:
        """Shard `index`, written unless already complete; its sidecar info."""
        return existing_shard(self.plan, index) or self._write(index)

    def _write(self, index: int) -> dict[str, Any]:
        plan, data = self.plan, self.plan.data
        if self._dataset is None:
            loaded = plan.load_input()
            self._dataset = lambda: loaded
        if self._backend is None:
            self._backend = plan.load_backend()
        part = self._dataset().shard(plan.num_shards, index, contiguous=True)
        dtype = np.dtype(plan.identity["dtype"]).type
        eos = np.array([plan.eos_token_id], dtype=dtype)
        pieces: list[np.ndarray] = []
        for batch in part.iter(batch_size=DOCS_PER_BATCH):
            for texts in _by_bytes(batch["text"], ENCODE_BATCH_BYTES):
                for encoding in self._backend.encode_batch_fast(texts, add_special_tokens=False):
                    pieces.append(np.asarray(encoding.ids, dtype=dtype))
                    pieces.append(eos)
        tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        seq_len = data["seq_len"]
        num_sequences = len(tokens) // seq_len
        name = f"shard-{index:05d}.bin"
        write_bytes_atomically(plan.folder / name, tokens[: num_sequences * seq_len].tobytes())
        info = {
            "file": name,
            "key": plan.shard_key(index),
            "num_sequences": num_sequences,
            "num_val": math.ceil(num_sequences * data["val_fraction"]) if num_sequences >= 2 else 0,
            "num_bytes": num_sequences * seq_len * np.dtype(dtype).itemsize,
            "xxh3_128": file_checksum(plan.folder / name),
        }
        write_json_atomically(plan.folder / f"shard-{index:05d}.json", info)
        return info


def _by_bytes(texts: Sequence[str], limit: int) -> Iterator[list[str]]:
    """Consecutive runs of `texts` of about `limit` characters (at least one text each)."""
    run: list[str] = []
    size = 0
    for text in texts:
        if run and size + len(text) > limit:
            yield run
            run, size = [], 0
        run.append(text)
        size += len(text)
    if run:
        yield run


def finalize(plan: Plan) -> Path:
    """Write meta.json from the complete shards' sidecars; refuses while any shard is incomplete."""
    shards = []
    for index in range(plan.num_shards):
        info = existing_shard(plan, index)
        if info is None:
            raise UserInputError(f"prepared data {plan.out}: shard {index} of {plan.num_shards} is incomplete, so "
                                 "meta.json is not written; prepare again (complete shards are kept)")
        shards.append(info)
    seq_len = plan.data["seq_len"]
    meta = {
        **plan.identity,
        "tokenizer_vocab_size": plan.tokenizer_vocab_size,
        "num_tokens": sum(s["num_sequences"] for s in shards) * seq_len,
        "num_train_sequences": sum(s["num_sequences"] - s["num_val"] for s in shards),
        "num_val_sequences": sum(s["num_val"] for s in shards),
        "shards": shards,
    }
    if meta["num_train_sequences"] < 1 or meta["num_val_sequences"] < 1:
        raise UserInputError(f"data.paths {plan.data['paths']}: too little text for one training and one validation "
                             f"sequence of {seq_len} tokens; add text or lower data.seq_len")
    remove_stale_temp_files(plan.folder)
    write_json_atomically(plan.folder / "meta.json", meta)
    log.info("prepared %s: %d tokens, %d train + %d val sequences in %d shard(s)", plan.out, meta["num_tokens"],
             meta["num_train_sequences"], meta["num_val_sequences"], len(shards))
    return plan.folder


# A temp file untouched this long belongs to a writer that is gone (killed mid-file). A younger one may be
# another node's writer of the same shard (nodes without rank 0's files prepare too): never pulled from under it.
STALE_TEMP_S = 3600.0


def remove_stale_temp_files(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the shard temp files that killed writers left (every shard is complete when this runs)."""
    now = time.time() if now is None else now
    removed = []
    for temp in folder.glob(".shard-*.tmp"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_S:
                temp.unlink(missing_ok=True)
                removed.append(temp)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    return removed


def all_units(plans: Sequence[Plan]) -> list[Unit]:
    """Every shard of every plan, in order."""
    return [(p, s) for p, plan in enumerate(plans) for s in range(plan.num_shards)]


def incomplete_units(plans: Sequence[Plan]) -> list[Unit]:
    """The shards still to write (what a resumed preparation schedules)."""
    return [(p, s) for p, s in all_units(plans) if existing_shard(plans[p], s) is None]


def chunk(units: Sequence[Unit], num_tasks: int, task: int) -> list[Unit]:
    """Task `task`'s share of `units`: contiguous, sizes differing by at most one, every unit in one task."""
    return list(units[task * len(units) // num_tasks: (task + 1) * len(units) // num_tasks])


def write_units(plans: Sequence[Plan], units: Sequence[Unit]) -> list[dict[str, Any]]:
    """Write these shards (complete ones skipped); each plan's documents and tokenizer load once."""
    writers: dict[int, ShardWriter] = {}
    infos = []
    for p, s in units:
        writer = writers.setdefault(p, ShardWriter(plans[p]))
        infos.append(writer.write(s))
    return infos


def save_plans(path: Path, plans: Sequence[Plan], units: Sequence[Unit], num_tasks: int) -> None:
    """The plans file a job array reads: the plans, the shards to write and how many tasks share them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"plans": [dataclasses.asdict(p) for p in plans], "units": [list(u) for u in units],
               "num_tasks": num_tasks}
    write_bytes_atomically(path, json.dumps(payload).encode())


def load_plans(path: Path) -> tuple[list[Plan], list[Unit], int]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserInputError(f"plans file {path}: missing or unreadable; submit the preparation again") from None
    return ([Plan(**p) for p in payload["plans"]], [(p, s) for p, s in payload["units"]], payload["num_tasks"])
