"""Find and read the text documents of a corpus (files and folders, or this Python's stdlib source)."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from bigmodel_dist.config.validate import PYTHON_STDLIB
from bigmodel_dist.errors import UserInputError


def corpus_files(paths: list[str], extensions: list[str]) -> list[Path]:
    """Every matching file under `paths`, sorted, so the corpus is the same on every rank and machine."""
    files: list[Path] = []
    for entry in paths:
        root = Path(sysconfig.get_paths()["stdlib"]) if entry == PYTHON_STDLIB else Path(entry)
        if root.is_file():
            files.append(root)
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix in extensions and path.is_file() and not _skipped(path, root):
                files.append(path)
    if not files:
        raise UserInputError(f"data.paths {paths}: no files with suffixes {extensions}; add text files or fix data.extensions")
    return files


def _skipped(path: Path, root: Path) -> bool:
    # Installed packages are not part of the stdlib corpus, and test data trees hold odd encodings.
    parts = path.relative_to(root).parts
    return "site-packages" in parts or "__pycache__" in parts


def read_documents(files: list[Path], max_bytes: int = 0) -> Iterator[str]:
    """Each file is one document; stop once `max_bytes` of text were read (0 = read all)."""
    total = 0
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        yield text
        total += len(text.encode("utf-8"))
        if max_bytes and total >= max_bytes:
            return


def corpus_fingerprint(files: list[Path], max_bytes: int) -> str:
    """Changes when the file list, a file's size or mtime, or the byte cap changes."""
    digest = hashlib.sha256(str(max_bytes).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
