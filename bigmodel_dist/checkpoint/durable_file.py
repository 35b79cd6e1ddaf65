"""Write a checkpoint file at the disk's speed, durably, checksummed as it is written.

`torch.save` into a `DurableFile` instead of a path:
- the bytes are hashed (xxh3-128, the checksum `integrity.check_files` verifies) on their way to the disk,
  so no second pass reads the file back;
- large records (tensor storages, handed over by torch as zero-copy memoryviews) are cut into
  `CHUNK_BYTES` pieces written by a small thread pool at their offsets (`os.pwrite` releases the GIL),
  so copying into the page cache runs on several cores while the next record is pickled;
- each finished piece is pushed to the disk at once (`sync_file_range`, Linux) and at most
  `WRITEBACK_WINDOW` pieces are dirty at a time: the disk writes while serialization goes on, and the
  final `fsync` has only the last pieces left instead of the whole file;
- torch's own per-record CRC32 is switched off for the save (0.35 s per GiB here): the whole-file
  xxh3 covers every byte, records and zip headers alike.

O_DIRECT is not used: measured here it is slower (0.38-0.41 GB/s) than buffered writes with early
writeback (0.45-0.50 GB/s, `dd conv=fdatasync`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 16 << 20  # a piece one thread writes and then hands to the disk
SMALL_WRITE_BYTES = 1 << 20  # writes below this (pickle, zip headers) are gathered into one buffer first
WRITEBACK_WINDOW = 8  # pieces in flight (written, not yet on disk) before the writer waits for the oldest
MAX_WRITE_THREADS = 4

_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _load_sync_file_range():
    """libc's sync_file_range, or None where there is none (not Linux): then only the final fsync runs."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range()


def write_threads(configured: int, local_world_size: int) -> int:
    """`checkpoint.write_threads`, or when 0 this rank's share of the machine's cores (1..4): on 2 cores
    with 2 ranks a second thread per rank only contends (measured 0.43 vs 0.50 GB/s)."""
    if configured > 0:
        return configured
    return max(1, min(MAX_WRITE_THREADS, (os.cpu_count() or 1) // max(1, local_world_size)))


@dataclass(frozen=True)
class FileDigest:
    size: int
    xxh3_128: str

    def as_meta(self) -> dict[str, Any]:
        return {"size": self.size, "xxh3_128": self.xxh3_128}


class DurableFile:
    """A write-only file object for `torch.save`: parallel positioned writes, hashing, early writeback.

    `close()` waits for every write, fsyncs and returns the file's `FileDigest`; `abandon()` (on an error)
    waits and closes without syncing. Writes are sequential from the caller's view: the file's bytes are
    exactly the concatenation of what `write` received.
    """

    def __init__(self, path: Path | str, pool: ThreadPoolExecutor):
        import xxhash

        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pool = pool
        self._hash = xxhash.xxh3_128()
        self._small = bytearray()
        self._position = 0  # bytes handed to writes so far (the offset of the next byte)
        self._in_flight: deque[tuple[Future, int, int]] = deque()  # (write, offset, length), oldest first

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        self._hash.update(view)
        if length < SMALL_WRITE_BYTES:
            self._small += view
            if len(self._small) >= SMALL_WRITE_BYTES:
                self._write_small()
            return length
        self._write_small()
        for start in range(0, length, CHUNK_BYTES):
            self._submit(view[start:start + CHUNK_BYTES])  # the caller's buffer lives until close()
        return length

    def flush(self) -> None:
        """torch.save calls it; the data goes to the disk in `close`."""

    def close(self) -> FileDigest:
        try:
            self._write_small()
            self._drain(0)
            os.fsync(self._fd)
        finally:
            self.abandon()
        return FileDigest(self._position, self._hash.hexdigest())

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._drain(0)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write_small(self) -> None:
        if self._small:
            self._submit(memoryview(bytes(self._small)))
            self._small.clear()

    def _submit(self, piece: memoryview) -> None:
        self._drain(WRITEBACK_WINDOW - 1)
        offset = self._position
        self._position += len(piece)
        self._in_flight.append((self._pool.submit(_write_at, self._fd, piece, offset), offset, len(piece)))

    def _drain(self, keep: int) -> None:
        """Wait until at most `keep` pieces are in flight: the oldest ones written and on the disk."""
        while len(self._in_flight) > keep:
            future, offset, length = self._in_flight.popleft()
            future.result()  # raises the write's OSError (a full disk) here, in the saving thread
            if _sync_file_range is not None:
                flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
                _sync_file_range(self._fd, offset, length, flags)


def _write_at(fd: int, piece: memoryview, offset: int) -> None:
    done = 0
    while done < len(piece):
        written = os.pwrite(fd, piece[done:], offset + done)
        if written == 0:
            raise OSError(f"wrote 0 bytes at offset {offset + done}")
        done += written
    if _sync_file_range is not None:  # start writeback now; `_drain` waits for it later
        _sync_file_range(fd, offset, len(piece), _SYNC_FILE_RANGE_WRITE)


_crc_lock = threading.Lock()


@contextlib.contextmanager
def _torch_crc32_off():
    """torch.save without its per-record CRC32 (a process-wide switch, restored afterwards)."""
    import torch.serialization

    with _crc_lock:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(before)


def save_durably(state: Any, path: Path | str, pool: ThreadPoolExecutor) -> FileDigest:
    """`torch.save(state, path)`, fsynced, with its digest; a failed write leaves an incomplete file
    (its checkpoint directory stays partial and is never chosen) and raises."""
    import torch

    handle = DurableFile(path, pool)
    try:
        with _torch_crc32_off():
            torch.save(state, handle)  # type: ignore[arg-type]  # a file object with write()
    except BaseException:
        handle.abandon()
        raise
    return handle.close()
