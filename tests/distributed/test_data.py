"""Data pipeline: prepare (round trip, idempotence, bad input), exact resumable per-rank loading."""

from __future__ import annotations

import json
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bigmodel_dist.config import load_config
from bigmodel_dist.config.layout import BatchLayout
from bigmodel_dist.core.errors import UserInputError
from bigmodel_dist.core.fileio import file_checksum
from bigmodel_dist.data.batch_loader import BatchLoader, micro_batch
from bigmodel_dist.data.dataset import PackedDataset
from bigmodel_dist.data.prepare import prepare_data
from bigmodel_dist.data.sampler import ShuffledOrder
from tests.conftest import REPO
from tests.helpers.commands import ERROR_PREFIX, TINY_CONFIG, assert_one_line_error, run_cli, run_command

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small real corpus: a few stdlib modules as text files, and the same text as JSON lines."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    for name in ("json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "shlex.py", "fnmatch.py"):
        (root / "text" / name.replace("/", "_")).write_text((STDLIB / name).read_text())
    return root / "text"


def _data_cfg(corpus: Path, **fields):
    overrides = [f"--data.paths=[{corpus}]", "--data.seq_len=64"] + [f"--data.{k}={v}" for k, v in fields.items()]
    return load_config(None, overrides).data


def test_round_trip_decode_reproduces_documents_joined_by_eos(corpus, tmp_path):
    prepared = prepare_data(_data_cfg(corpus), 512, tmp_path, progress=False)
    data = PackedDataset(prepared)
    tokens = np.concatenate([data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))])
    decoded = data.tokenizer().decode(tokens.tolist())
    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    joined = "".join(doc + "<|endoftext|>" for doc in docs)
    assert len(decoded) > 0.95 * len(joined)  # only the last partial sequence is dropped
    assert joined.startswith(decoded[:-8])  # a trailing token may end inside a character
    assert data.meta["dtype"] == "uint16" and data.meta["seq_len"] == 64


def test_prepare_is_idempotent_and_redoes_only_incomplete_shards(corpus, tmp_path):
    cfg = _data_cfg(corpus, shard_bytes=20000, prepared_dir=tmp_path / "prep")
    prepared = prepare_data(cfg, 512, tmp_path, progress=False)
    shards = sorted(prepared.glob("shard-*.bin"))
    assert len(shards) >= 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # a killed run: meta.json not yet written, one shard's sidecar missing, a stray temp file
    (prepared / "meta.json").unlink()
    (prepared / "shard-00001.json").unlink()
    (prepared / ".shard-00002.bin.x.tmp").write_bytes(b"half")
    prepare_data(cfg, 512, tmp_path, progress=False)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(prepared.glob("shard-*.bin"))}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][1] == before[name][1]  # same bytes
        assert (after[name][0] == before[name][0]) == (name != "shard-00001.bin")  # only the incomplete one redone
    PackedDataset(prepared)  # checksums match


def test_jsonl_and_parquet_inputs(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[:3]))
    pq.write_table(pa.table({"content": docs[3:]}), folder / "b.parquet")
    data = PackedDataset(prepare_data(_data_cfg(folder, text_column="content"), 512, tmp_path, progress=False))
    assert len(data.train) > 100


def _ranks_samples(rows, layout, seed, steps, start=0):
    order = ShuffledOrder(len(rows), seed)
    return [[int(x) for r in range(layout.data_parallel_size) for m in range(layout.grad_accum_steps)
             for x in micro_batch(rows, order, layout, s, m, r)[:, 0]] for s in range(start, start + steps)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_ranks_are_disjoint_and_complete_per_epoch(world):
    rows = np.arange(48).reshape(48, 1)  # row i holds token i: a batch shows which rows it took
    layout = BatchLayout(12, 1, 12 // world, world)
    for epoch in range(2):
        seen = [x for step in _ranks_samples(rows, layout, 5, 4, start=4 * epoch) for x in step]
        assert sorted(seen) == list(range(48))


def test_loader_resume_continues_with_identical_batches():
    rows = np.arange(100 * 8).reshape(100, 8)
    layout = BatchLayout(8, 2, 2, 2)
    straight = BatchLoader(rows, layout, rank=1, seed=3)
    expected = [straight.next(s, m).numpy() for s in range(6) for m in range(2)]
    straight.close()
    first = BatchLoader(rows, layout, rank=1, seed=3)
    got = [first.next(s, m).numpy() for s in range(3) for m in range(2)]
    first.close()
    resumed = BatchLoader(rows, layout, rank=1, seed=3, start_step=3)  # the cursor: 3 steps x 8 samples
    got += [resumed.next(s, m).numpy() for s in range(3, 6) for m in range(2)]
    resumed.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_repeats_and_skips_nothing(before, after):
    rows = np.arange(90).reshape(90, 1)
    global_batch = 6
    straight = _ranks_samples(rows, BatchLayout(global_batch, 1, global_batch // before, before), 9, 10)
    first = _ranks_samples(rows, BatchLayout(global_batch, 1, global_batch // before, before), 9, 4)
    rest = _ranks_samples(rows, BatchLayout(global_batch, 1, global_batch // after, after), 9, 6, start=4)
    assert [sorted(s) for s in first + rest] == [sorted(s) for s in straight]
    consumed = [x for s in first + rest for x in s]
    assert sorted(consumed) == sorted(set(consumed)) and len(consumed) == 60  # 60 of 90: none twice


PREPARE = ["prepare", TINY_CONFIG]


def test_bad_inputs_give_one_line(tmp_path, cli_env):
    def refused(path: Path, *needles: str) -> None:
        result = run_cli([*PREPARE, f"--data.paths=[{path}]", f"--output_dir={tmp_path}"], cwd=tmp_path, env=cli_env)
        assert_one_line_error(result, *needles)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(empty, "empty.txt", "empty")
    refused(tmp_path / "absent", "absent", "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.parquet").write_bytes(b"PAR1 this is not parquet at all")
    refused(broken, "x.parquet", "Parquet")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{not json\n")
    refused(bad_json, "bad.jsonl", "not JSON")


def test_tokenizer_too_big_for_uint16_is_rejected(corpus, tmp_path, cli_env):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)} | {"<unk>": 70000, "<|endoftext|>": 70001}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(str(tmp_path / "big"))
    args = [*PREPARE, f"--data.paths=[{corpus}]", f"--data.tokenizer={tmp_path / 'big'}", f"--output_dir={tmp_path}"]
    result = run_cli([*args, "--data.token_dtype=uint16", "--model.vocab_size=70016"], cwd=tmp_path, env=cli_env)
    assert_one_line_error(result, "data.token_dtype", "70002")
    assert_one_line_error(run_cli(args, cwd=tmp_path, env=cli_env), "70002", "model.vocab_size")


def _assert_prepared_as_promised(out: Path, seq_len: int) -> dict:
    """meta.json's promises hold: every listed shard is there with its size and checksum, no other shard
    is, and its counts are what the dataset opens. Returns the meta."""
    meta = json.loads((out / "meta.json").read_text())
    itemsize = np.dtype(meta["dtype"]).itemsize
    assert sorted(p.name for p in out.glob("shard-*.bin")) == sorted(info["file"] for info in meta["shards"])
    for info in meta["shards"]:
        shard = out / info["file"]
        assert shard.stat().st_size == info["num_bytes"] == info["num_sequences"] * seq_len * itemsize, info
        assert file_checksum(shard) == info["xxh3_128"], info
    num_sequences = sum(info["num_sequences"] for info in meta["shards"])
    assert meta["num_train_sequences"] + meta["num_val_sequences"] == num_sequences
    assert meta["num_tokens"] == num_sequences * seq_len and meta["seq_len"] == seq_len
    data = PackedDataset(out)
    assert (len(data.train), len(data.val)) == (meta["num_train_sequences"], meta["num_val_sequences"])
    return meta


def test_prepared_data_for_another_config_is_refused_and_kept(corpus, tmp_path, cli_env):
    out = tmp_path / "prep"
    args = [*PREPARE, f"--data.paths=[{corpus}]", f"--out={out}", f"--output_dir={tmp_path}"]
    first = run_cli([*args, "--data.seq_len=64"], cwd=tmp_path, env=cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_one_line_error(run_cli([*args, "--data.seq_len=128"], cwd=tmp_path, env=cli_env),
                          "meta.json", "seq_len=64", "128")
    other_tok = tmp_path / "othertok"
    PackedDataset(out).tokenizer().save_pretrained(str(other_tok))
    (other_tok / "tokenizer.json").write_text((other_tok / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|eot|>"'))
    result = run_cli([*args, "--data.seq_len=64", f"--data.tokenizer={other_tok}"], cwd=tmp_path, env=cli_env)
    assert_one_line_error(result, "meta.json", "tokenizer_fingerprint")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot


def test_corrupt_and_truncated_shards_are_named(corpus, tmp_path, cli_env):
    out = tmp_path / "prep"
    args = [*PREPARE, f"--data.paths=[{corpus}]", "--data.seq_len=64", f"--out={out}", f"--output_dir={tmp_path}"]
    first = run_cli(args, cwd=tmp_path, env=cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    shard = out / "shard-00000.bin"
    payload = bytearray(shard.read_bytes())
    payload[100] ^= 0xFF
    shard.write_bytes(bytes(payload))
    assert_one_line_error(run_cli(args, cwd=tmp_path, env=cli_env), "shard-00000.bin", "checksum")
    with pytest.raises(UserInputError, match="checksum"):
        PackedDataset(out)
    shard.write_bytes(bytes(payload[:-10]))
    with pytest.raises(UserInputError, match="truncated"):
        PackedDataset(out, verify="size")
    assert shard.stat().st_size == len(payload) - 10  # reported, never "repaired" behind the user's back


@pytest.mark.distributed
def test_prepare_then_train_two_ranks_zero2(corpus, tmp_path, cli_env):
    from tests.conftest import TINY
    from tests.helpers.spawn import run_distributed
    from tests.helpers.workers import train_and_collect

    out = tmp_path / "prep"
    prepared = run_cli([*PREPARE, f"--data.paths=[{corpus}]", "--data.seq_len=128", "--data.max_bytes=400000",
                        f"--out={out}", f"--output_dir={tmp_path}"], cwd=tmp_path, env=cli_env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    meta = _assert_prepared_as_promised(out, seq_len=128)
    assert prepared.stdout.strip() == (f"{out}: {meta['num_train_sequences']} train + {meta['num_val_sequences']} val "
                                       "sequences of 128 tokens")
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    overrides = [*TINY, f"--output_dir={tmp_path}", f"--data.prepared_dir={out}", f"--data.paths=[{corpus}]",
                 "--deepspeed.config=zero2", "--train.max_steps=8", "--train.eval_every=4", "--name=e2e"]
    losses = run_distributed(train_and_collect, 2, overrides)[0]["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    # training read the prepared folder as it was (nothing rewritten or added) and built no other one
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files
    assert not list(tmp_path.glob(".cache/prepared-*"))


def _corrupt(shard: Path) -> None:
    payload = bytearray(shard.read_bytes())
    payload[100] ^= 0xFF
    shard.write_bytes(bytes(payload))


@pytest.mark.distributed
def test_launch_local_rebuilds_a_corrupted_cache_shard_before_starting(corpus, tmp_path, cli_env):
    """A shard of the derived cache is damaged: the launcher finds it before torchrun and rebuilds that
    shard (the cache is ours to redo); the run then trains on whole data."""
    overrides = [f"--data.paths=[{corpus}]", "--data.seq_len=64", f"--output_dir={tmp_path}",
                 "--logging.wandb_mode=disabled", "--train.max_steps=1", "--train.eval_every=0"]
    assert run_cli([*PREPARE, *overrides], cwd=tmp_path, env=cli_env).returncode == 0
    (shard,) = tmp_path.glob(".cache/prepared-*/shard-00000.bin")
    _corrupt(shard)
    result = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=1", *overrides], cwd=tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"prepared shard {shard}: checksum mismatch (corrupted): rebuilding it" in result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    meta = json.loads((shard.parent / "meta.json").read_text())
    assert file_checksum(shard) == meta["shards"][0]["xxh3_128"]


@pytest.mark.distributed
def test_a_corrupted_explicit_prepared_folder_is_refused_before_any_process(corpus, tmp_path, cli_env):
    out = tmp_path / "prep"
    overrides = [f"--data.paths=[{corpus}]", "--data.seq_len=64", f"--output_dir={tmp_path}",
                 "--logging.wandb_mode=disabled", "--train.max_steps=1"]
    assert run_cli([*PREPARE, *overrides, f"--out={out}"], cwd=tmp_path, env=cli_env).returncode == 0
    _corrupt(out / "shard-00000.bin")
    damaged = (out / "shard-00000.bin").read_bytes()
    result = run_cli(["launch", "local", TINY_CONFIG, "--nproc-per-node=2", *overrides, f"--data.prepared_dir={out}"],
                     cwd=tmp_path, env=cli_env)
    assert_one_line_error(result, "shard-00000.bin", "checksum mismatch", after_logs=True)
    assert "launching" not in result.stderr
    assert (out / "shard-00000.bin").read_bytes() == damaged  # reported, not repaired behind the user's back


@pytest.mark.distributed
def test_a_rank_that_loses_its_peers_says_so_in_one_line(corpus, tmp_path, cli_env):
    """Without our launcher (torchrun itself): rank 0 finds the corrupted shard (local rank 0 checks
    checksums), rank 1's next collective breaks. Each prints one line; none prints our frames."""
    out = tmp_path / "prep"
    overrides = [f"--data.paths=[{corpus}]", "--data.seq_len=64", f"--output_dir={tmp_path}",
                 "--logging.wandb_mode=disabled", "--train.max_steps=1"]
    assert run_cli([*PREPARE, *overrides, f"--out={out}"], cwd=tmp_path, env=cli_env).returncode == 0
    _corrupt(out / "shard-00000.bin")
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "launcher.cli",
                          "train", TINY_CONFIG, *overrides, f"--data.prepared_dir={out}"], cwd=tmp_path, env=cli_env)
    output = result.stdout + result.stderr
    errors = sorted(line for line in output.splitlines() if line.startswith(ERROR_PREFIX))
    assert result.returncode != 0 and len(errors) == 2, output[-4000:]
    assert "checksum mismatch (corrupted)" in errors[0]
    assert errors[1].startswith(f"{ERROR_PREFIX} rank 1: lost contact with the other ranks (Connection closed by peer")
    ours = re.compile(rf'File "{re.escape(str(REPO))}/(bigmodel_dist|launcher)/')
    assert not ours.search(output), output[-4000:]  # no frames of ours (torchrun's own report aside)
