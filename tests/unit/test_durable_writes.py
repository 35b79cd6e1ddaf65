"""Checkpoint files written at the disk's speed keep their guarantees: exact bytes, the checksum the
verifier computes, fsynced, a clear error on a full disk; async staging buffers are reused, never shared
with the live state."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bigmodel_dist.checkpoint import durable_file
from bigmodel_dist.checkpoint.durable_file import DurableFile, save_durably, write_threads
from bigmodel_dist.checkpoint.snapshot_engine import stage, tensor_bytes
from bigmodel_dist.core.fileio import file_checksum


@pytest.fixture
def pool():
    with ThreadPoolExecutor(3) as executor:
        yield executor


def test_mixed_small_and_large_writes_land_in_order_with_the_verifiers_checksum(tmp_path, pool):
    generator = torch.Generator().manual_seed(0)
    sizes = [10, 3 << 20, 1, 999, (durable_file.SMALL_WRITE_BYTES - 1), 40 << 20, 7, 17 << 20, 5]
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes() for n in sizes]
    target = tmp_path / "mixed.bin"
    handle = DurableFile(target, pool)
    for piece in pieces:
        assert handle.write(memoryview(piece)) == len(piece)
    digest = handle.close()
    assert target.read_bytes() == b"".join(pieces)  # pieces written by several threads at their offsets
    assert digest.size == sum(sizes) and digest.xxh3_128 == file_checksum(target)


def test_the_callers_buffer_can_change_as_soon_as_write_returns(tmp_path, pool):
    """torch frees what it hands over (the pickle, a GPU tensor's host copy) right after `write`."""
    buffer = bytearray(b"a" * (5 << 20))
    small = bytearray(b"b" * 100)
    handle = DurableFile(tmp_path / "reused.bin", pool)
    handle.write(buffer)
    buffer[:] = b"z" * len(buffer)
    handle.write(small)
    small[:] = b"y" * len(small)
    handle.write(buffer)
    digest = handle.close()
    expected = b"a" * (5 << 20) + b"b" * 100 + b"z" * (5 << 20)
    assert (tmp_path / "reused.bin").read_bytes() == expected and digest.xxh3_128 == file_checksum(tmp_path / "reused.bin")


def test_a_saved_state_loads_back_and_torch_crc_setting_is_restored(tmp_path, pool):
    state = {"weights": torch.randn(3, 1 << 20), "step": 7, "nested": [torch.arange(5), {"bias": torch.ones(2)}]}
    before = torch.serialization.get_crc32_options()
    digest = save_durably(state, tmp_path / "state.pt", pool)
    assert torch.serialization.get_crc32_options() == before
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["step"] == 7
    assert torch.equal(loaded["nested"][1]["bias"], torch.ones(2))
    assert digest.xxh3_128 == file_checksum(tmp_path / "state.pt")


def test_a_full_disk_raises_its_os_error_in_the_saving_thread_and_leaves_no_open_file(small_tmpfs, pool):
    disk = small_tmpfs(4)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as raised:
        save_durably({"too_big": torch.zeros(8 << 20)}, disk / "state.pt", pool)  # 32 MiB into 4 MiB
    assert raised.value.errno == errno.ENOSPC
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_write_threads_default_to_the_ranks_share_of_the_cores():
    assert write_threads(3, local_world_size=8) == 3  # an explicit setting wins
    cores = os.cpu_count() or 1
    assert write_threads(0, local_world_size=1) == max(2, min(4, cores))
    assert write_threads(0, local_world_size=cores * 2) == 2  # they wait on the disk: two even on a shared core


def test_staging_reuses_its_buffers_and_never_aliases_the_live_state():
    live = {"module": {"w": torch.randn(4, 4), "b": torch.randn(4)}, "step": 3, "shards": [torch.randn(6)]}
    first = stage(live)
    assert first["module"]["w"].data_ptr() != live["module"]["w"].data_ptr()
    live["module"]["w"].add_(1.0)  # training goes on: the staged copy keeps the old values
    assert not torch.equal(first["module"]["w"], live["module"]["w"])
    buffers = {id(first["module"]["w"]), id(first["module"]["b"]), id(first["shards"][0])}
    second = stage(live, first)
    assert {id(second["module"]["w"]), id(second["module"]["b"]), id(second["shards"][0])} == buffers  # reused
    assert torch.equal(second["module"]["w"], live["module"]["w"]) and second["step"] == 3
    grown = stage({**live, "shards": [torch.randn(7)]}, second)  # another shape: a new buffer
    assert id(grown["shards"][0]) not in buffers and grown["shards"][0].shape == (7,)
    assert tensor_bytes(second) == (16 + 4 + 6) * 4



def test_a_tensor_held_twice_is_staged_once():
    embedding = torch.randn(8, 4)
    live = {"wte.weight": embedding, "lm_head.weight": embedding}  # tied, as GPT-2's state dict has them
    staged = stage(live)
    assert staged["wte.weight"] is staged["lm_head.weight"]
    assert tensor_bytes(staged) == 8 * 4 * 4
    again = stage(live, staged)
    assert again["wte.weight"] is staged["wte.weight"] and again["lm_head.weight"] is staged["wte.weight"]
    untied = stage({"wte.weight": embedding, "lm_head.weight": embedding.clone() + 1}, staged)
    assert untied["wte.weight"] is not untied["lm_head.weight"]  # one buffer never serves two tensors
    assert torch.equal(untied["lm_head.weight"], embedding + 1) and torch.equal(untied["wte.weight"], embedding)
