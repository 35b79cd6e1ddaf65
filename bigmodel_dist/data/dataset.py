"""Read a prepared folder: memory-mapped shards, checked, addressed as one train and one val split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.fileio import file_checksum
from bigmodel_dist.data.prepare import read_prepared_meta


class PackedDataset:
    """Fixed-length token sequences from a prepared folder; `train[i]` / `val[i]` are (seq_len,) arrays."""

    def __init__(self, prepared: Path, verify: str = "checksum"):
        self.path = Path(prepared)
        self.meta = read_prepared_meta(self.path)
        self.seq_len = self.meta["seq_len"]
        dtype = np.dtype(self.meta["dtype"])
        train_parts, val_parts = [], []
        for info in self.meta["shards"]:
            rows = _open_shard(self.path / info["file"], info, dtype, self.seq_len, verify)
            split = info["num_sequences"] - info["num_val"]
            train_parts.append(rows[:split])
            val_parts.append(rows[split:])
        self.train = _Concatenated(train_parts)
        self.val = _Concatenated(val_parts)

    def tokenizer(self):
        from bigmodel_dist.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer")


def _open_shard(path: Path, info: dict, dtype: np.dtype, seq_len: int, verify: str) -> np.ndarray:
    problem = shard_problem(path, info, verify)
    if problem:
        raise UserInputError(problem)
    if info["num_sequences"] == 0:
        return np.empty((0, seq_len), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["num_sequences"], seq_len))


def shard_problem(path: Path, info: dict, verify: str = "checksum") -> str | None:
    """What is wrong with a prepared shard (missing, truncated, corrupted), as one line; None if it is whole."""
    if not path.is_file():
        return f"prepared shard {path}: missing; run `bigmodel prepare` again to rebuild it"
    if path.stat().st_size != info["num_bytes"]:
        return (f"prepared shard {path}: {path.stat().st_size} bytes, expected {info['num_bytes']} (truncated?); "
                "delete it and run `bigmodel prepare` again")
    if verify == "checksum" and file_checksum(path) != info["xxh3_128"]:
        return f"prepared shard {path}: checksum mismatch (corrupted); delete it and run `bigmodel prepare` again"
    return None


def damaged_shards(prepared: Path, verify: str = "checksum") -> list[tuple[dict, str]]:
    """Each damaged shard of a complete prepared folder: (its entry in meta.json, what is wrong)."""
    found = []
    for info in read_prepared_meta(prepared)["shards"]:
        problem = shard_problem(prepared / info["file"], info, verify)
        if problem:
            found.append((info, problem))
    return found


class MixedDataset:
    """The prepared sources of a mixture: `sources[k]` is source k's training split, `val` every
    source's validation split together; one tokenizer for all (checked)."""

    def __init__(self, prepared: list[tuple[str, Path]], verify: str = "checksum"):
        self.names = [name for name, _ in prepared]
        self.parts = [PackedDataset(path, verify=verify) for _, path in prepared]
        fingerprints = {part.meta["tokenizer_fingerprint"] for part in self.parts}
        if len(fingerprints) > 1:
            raise UserInputError(f"data.sources: {', '.join(str(p.path) for p in self.parts)} were tokenized with "
                                 "different tokenizers; prepare them again with one (data.tokenizer)")
        seq_lens = {part.seq_len for part in self.parts}
        if len(seq_lens) > 1:
            raise UserInputError(f"data.sources: prepared with different sequence lengths {sorted(seq_lens)}")
        for name, part in zip(self.names, self.parts):
            if len(part.train) == 0:
                raise UserInputError(f"data.sources {name}: {part.path} holds no training sequence; add text to it")
        self.sources = [part.train for part in self.parts]
        self.train = _Concatenated(self.sources)  # for counting only: sampling goes through the mixture
        self.val = _Concatenated([part.val for part in self.parts])
        self.seq_len = self.parts[0].seq_len

    def tokenizer(self):
        return self.parts[0].tokenizer()


class _Concatenated:
    """Row-indexing over several arrays as if they were one."""

    def __init__(self, parts: Sequence[np.ndarray | _Concatenated]):
        self._parts = [p for p in parts if len(p)]
        self._ends = np.cumsum([len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self._parts[part][index - start]
