"""Read a prepared folder: memory-mapped shards, checked, addressed as one train and one val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigmodel_dist.data.prepare import read_prepared_meta
from bigmodel_dist.errors import UserInputError
from bigmodel_dist.fileio import file_checksum


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
    if not path.is_file():
        raise UserInputError(f"prepared shard {path}: missing; run `bigmodel prepare` again to rebuild it")
    if path.stat().st_size != info["num_bytes"]:
        raise UserInputError(f"prepared shard {path}: {path.stat().st_size} bytes, expected {info['num_bytes']} "
                             "(truncated?); delete it and run `bigmodel prepare` again")
    if verify == "checksum" and file_checksum(path) != info["xxh3_128"]:
        raise UserInputError(f"prepared shard {path}: checksum mismatch (corrupted); delete it and run "
                             "`bigmodel prepare` again")
    if info["num_sequences"] == 0:
        return np.empty((0, seq_len), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["num_sequences"], seq_len))


class _Concatenated:
    """Row-indexing over several arrays as if they were one."""

    def __init__(self, parts: list[np.ndarray]):
        self._parts = [p for p in parts if len(p)]
        self._ends = np.cumsum([len(p) for p in self._parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self._parts[part][index - start]
