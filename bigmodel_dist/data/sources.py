"""Input corpora as a `datasets.Dataset` with one `text` column, checked file by file first.

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
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from bigmodel_dist.config.paths import PYTHON_STDLIB
from bigmodel_dist.config.schema import DataConfig
from bigmodel_dist.errors import UserInputError

TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` leaves in its folder


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def input_files(data_cfg: DataConfig) -> list[Path]:
    """Every input file, sorted, so the corpus is the same on every rank and machine."""
    files: list[Path] = []
    for i, entry in enumerate(data_cfg.paths):
        wanted = set(data_cfg.extensions)
        if entry == PYTHON_STDLIB:  # its .json files are test fixtures, not corpora
            wanted -= set(TABLE_SUFFIXES)
        root = Path(sysconfig.get_paths()["stdlib"]) if entry == PYTHON_STDLIB else Path(entry)
        if is_saved_dataset(root):
            files.append(root)  # one entry: `load_from_disk` reads the folder
        elif root.is_file():
            if root.stat().st_size == 0:
                raise UserInputError(f"data.paths[{i}] {entry}: is empty; remove it from data.paths")
            files.append(root)
        elif root.is_dir():  # empty files inside folders (package __init__.py) are skipped
            found = [p for p in _walk(root) if p.suffix in wanted and p.stat().st_size]
            if not found:
                raise UserInputError(f"data.paths[{i}] {entry}: no non-empty files ending in {sorted(wanted)}; "
                                     "add some or fix data.extensions")
            files += found
        else:
            raise UserInputError(f"data.paths[{i}] {entry}: does not exist; give a text/jsonl/parquet file or folder")
    return files


def _walk(root: Path) -> list[Path]:
    """Files under `root`, sorted; never descends into installed packages, caches or hidden folders
    (pruned, not filtered: the stdlib's site-packages can hold more files than the stdlib itself)."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "__pycache__") and not d.startswith(".")]
        files += [Path(folder, name) for name in names if not name.startswith(".")]
    return sorted(files)


def check_input_files(files: list[Path], data_cfg: DataConfig) -> None:
    """Fail on the first unreadable table file, naming it (before any process starts)."""
    for path in files:
        if is_saved_dataset(path):
            _check_saved_dataset(path, data_cfg.text_column)
        elif path.suffix == ".parquet":
            _check_parquet(path, data_cfg.text_column)
        elif path.suffix in (".jsonl", ".json"):
            _check_jsonl(path, data_cfg.text_column)


def _check_jsonl(path: Path, column: str) -> None:
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        row = json.loads(first)
    except ValueError:
        raise UserInputError(f"input file {path}: line 1 is not JSON; give one JSON object per line") from None
    if not isinstance(row, dict) or column not in row:
        raise UserInputError(f"input file {path}: line 1 has no {column!r} field; set data.text_column")


def _check_saved_dataset(path: Path, column: str) -> None:
    try:
        columns = _load_saved(path).column_names
    except Exception as exc:  # datasets raises several types for broken folders
        raise UserInputError(f"input folder {path}: not a readable `datasets` folder ({type(exc).__name__}); "
                             "save it again with save_to_disk") from None
    if column not in columns:
        raise UserInputError(f"input folder {path}: no column {column!r} (has {columns}); set data.text_column")


def _load_saved(path: Path):
    """A `save_to_disk` folder's Dataset (the train split of a DatasetDict)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserInputError(f"input folder {path}: a DatasetDict without a train split (has {list(loaded)})")
        loaded = loaded["train"]
    return loaded


def _check_parquet(path: Path, column: str) -> None:
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as exc:  # pyarrow raises several types for broken files
        raise UserInputError(f"input file {path}: not a readable Parquet file ({type(exc).__name__}); re-export it") from None
    if column not in schema.names:
        raise UserInputError(f"input file {path}: no column {column!r} (has {schema.names}); set data.text_column")


def source_fingerprint(files: list[Path], data_cfg: DataConfig) -> str:
    """Changes when a file, its size or mtime, the byte cap or the text column changes."""
    digest = hashlib.sha256(json.dumps([data_cfg.max_bytes, data_cfg.text_column, data_cfg.dataset]).encode())
    for member, stat in file_stats(files):
        digest.update(f"{member.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def file_stats(files: list[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file of `input_files` (the members of a saved-dataset folder included), sorted, with its stat."""
    for path in files:
        for member in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            yield member, member.stat()


def sources_here(data_cfg: DataConfig) -> bool:
    """Whether this machine has the config's input paths (data prepared elsewhere may not)."""
    return data_cfg.dataset is None and all(p == PYTHON_STDLIB or Path(p).exists() for p in data_cfg.paths)


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
            saved = _load_saved(folder)
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
