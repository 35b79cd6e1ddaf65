"""Input corpora as a `datasets.Dataset` with one `text` column (the files, found and checked: `config/inputs.py`).

Inputs: text-like files (each file one document: .txt .py .md .rst), JSON lines, Parquet and Arrow
(one document per row, `data.text_column`), folders of those, folders a `datasets` Dataset was saved to
(`save_to_disk`: read with `load_from_disk`), this interpreter's standard library ("python-stdlib", a
real corpus present everywhere), or a `datasets` name for the hub. Tables are read through the
`datasets` builders (`load_dataset("json"/"parquet"/"arrow", data_files=...)`): memory-mapped Arrow,
never all in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bigmodel_dist.config.inputs import TABLE_SUFFIXES, file_stats, is_saved_dataset, load_saved
from bigmodel_dist.config.schema import DataConfig
from bigmodel_dist.core.errors import UserInputError


def source_fingerprint(files: list[Path], data_cfg: DataConfig) -> str:
    """Changes when a file, its size or mtime, the byte cap or the text column changes."""
    digest = hashlib.sha256(json.dumps([data_cfg.max_bytes, data_cfg.text_column, data_cfg.dataset]).encode())
    for member, stat in file_stats(files):
        digest.update(f"{member.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_text_dataset(data_cfg: DataConfig, files: list[Path], cache_dir: Path, source_fp: str):
    """All documents as one Dataset (column `text`), capped at `data.max_bytes` when set."""
    import datasets

    datasets.disable_progress_bars()
    if data_cfg.dataset:  # hub path for real users; needs network or a local HF cache
        dataset = datasets.load_dataset(data_cfg.dataset, split="train", cache_dir=str(cache_dir / "hf"))
        dataset = _text_only(dataset, data_cfg.text_column)
    else:
        parts = []
        for folder in (p for p in files if is_saved_dataset(p)):
            saved = load_saved(folder)
            if data_cfg.text_column not in saved.column_names:
                raise UserInputError(f"input folder {folder}: no {data_cfg.text_column!r} column; set data.text_column")
            parts.append(_text_only(saved, data_cfg.text_column))
        text_files = [str(p) for p in files if p.suffix not in TABLE_SUFFIXES and not is_saved_dataset(p)]
        if text_files:
            parts.append(datasets.Dataset.from_generator(
                _read_documents, gen_kwargs={"paths": text_files, "source_fp": source_fp, "max_bytes": data_cfg.max_bytes}, cache_dir=str(cache_dir / "hf"),
                features=datasets.Features({"text": datasets.Value("string")})))
        for builder in ("json", "parquet", "arrow"):
            table_files = [str(p) for p in files if TABLE_SUFFIXES.get(p.suffix) == builder]
            if table_files:
                try:
                    table = datasets.load_dataset(builder, data_files=table_files, split="train",
                                                  cache_dir=str(cache_dir / "hf"))
                except datasets.exceptions.DatasetGenerationError as exc:
                    cause = exc.__cause__ or exc
                    raise UserInputError(f"input files {table_files[0]} (+{len(table_files) - 1} more): unreadable "
                                         f"as {builder} ({type(cause).__name__}); fix or remove the bad file") from None
                if data_cfg.text_column not in table.column_names:
                    raise UserInputError(f"input files {table_files[0]}...: no {data_cfg.text_column!r} field; set data.text_column")
                parts.append(_text_only(table, data_cfg.text_column))
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return _cap_bytes(dataset, data_cfg.max_bytes)


def _text_only(dataset, column: str):
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")


def _read_documents(paths: list[str], source_fp: str, max_bytes: int):
    del source_fp  # only part of the datasets cache key: a changed file is re-read
    total = 0
    for path in paths:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            yield {"text": text}
            total += len(raw)
            if max_bytes and total >= max_bytes:  # stop reading early, not after loading everything
                return


def _cap_bytes(dataset, max_bytes: int):
    """The first documents holding `max_bytes` of UTF-8 text (computed in Arrow, not in Python)."""
    if not max_bytes:
        return dataset
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.binary_length(pc.cast(dataset.data.column("text"), "binary")).to_numpy(zero_copy_only=False)
    cut = int(np.searchsorted(np.cumsum(lengths), max_bytes)) + 1
    return dataset if cut >= len(dataset) else dataset.select(range(cut))
