"""The input files a data config names, found and checked before any process starts: they exist, are not
empty, and tables hold the text column. Reading them into documents is `data/sources.py`'s job.

Inputs: text-like files (each file one document), JSON lines, Parquet and Arrow tables, folders of those,
folders a `datasets` Dataset was saved to, and this interpreter's standard library ("python-stdlib").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from bigmodel_dist.config.paths import PYTHON_STDLIB
from bigmodel_dist.config.schema import DataConfig, SourceConfig
from bigmodel_dist.core.errors import UserInputError

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
        columns = load_saved(path).column_names
    except Exception as exc:  # datasets raises several types for broken folders
        raise UserInputError(f"input folder {path}: not a readable `datasets` folder ({type(exc).__name__}); "
                             "save it again with save_to_disk") from None
    if column not in columns:
        raise UserInputError(f"input folder {path}: no column {column!r} (has {columns}); set data.text_column")


def load_saved(path: Path):
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


def file_stats(files: list[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file of `input_files` (the members of a saved-dataset folder included), sorted, with its stat."""
    for path in files:
        for member in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            yield member, member.stat()


def sources_here(data_cfg: DataConfig) -> bool:
    """Whether this machine has the config's input paths (data prepared elsewhere may not)."""
    return data_cfg.dataset is None and all(p == PYTHON_STDLIB or Path(p).exists() for p in data_cfg.paths)


def source_data_config(data: DataConfig, source: SourceConfig, tokenizer: str | None) -> DataConfig:
    """The single-pool data config that prepares one source (the run's packing settings, its files)."""
    return dataclasses.replace(data, paths=list(source.paths), dataset=source.dataset, text_column=source.text_column,
                               tokenizer=tokenizer, prepared_dir=None, sources=[], weights={})
