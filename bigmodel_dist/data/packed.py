"""Tokenise a corpus once, join documents with EOS, pack into fixed-length sequences, cache as .npy.

The cache file is keyed by corpus, tokenizer and sequence length, written to a temp name and renamed,
so a killed run never leaves a half file that a later run trusts. Sequences are memory-mapped on read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigmodel_dist.config.schema import DataConfig
from bigmodel_dist.data.corpus import corpus_files, corpus_fingerprint, read_documents
from bigmodel_dist.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from bigmodel_dist.errors import UserInputError


@dataclass
class PackedData:
    train: np.ndarray  # (num_train, seq_len) token ids
    val: np.ndarray  # (num_val, seq_len)
    tokenizer: object  # transformers PreTrainedTokenizerFast
    vocab_size: int  # ids are < this


def prepare_packed_data(data_cfg: DataConfig, model_vocab_size: int, cache_dir: Path) -> PackedData:
    """Load from cache or build: tokenizer (local or trained), token array, train/val split."""
    files = corpus_files(data_cfg.paths, data_cfg.extensions)
    corpus_key = corpus_fingerprint(files, data_cfg.max_bytes)
    if data_cfg.tokenizer is not None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    else:
        tok_dir = cache_dir / f"tokenizer-bpe{model_vocab_size}-{corpus_key}"
        if (tok_dir / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = train_bpe_tokenizer(read_documents(files, data_cfg.max_bytes), model_vocab_size, tok_dir)
    if len(tokenizer) > model_vocab_size:
        raise UserInputError(
            f"tokenizer {data_cfg.tokenizer}: {len(tokenizer)} tokens do not fit model vocab {model_vocab_size}; "
            "raise model.vocab_size"
        )
    key = hashlib.sha256(f"{corpus_key}:{tokenizer_fingerprint(tokenizer)}:{data_cfg.seq_len}".encode()).hexdigest()
    cache_file = cache_dir / f"packed-{key[:16]}.npy"
    if not cache_file.is_file():
        _write_atomically(cache_file, _pack(files, data_cfg, tokenizer))
    sequences = np.load(cache_file, mmap_mode="r")
    num_val = max(1, int(len(sequences) * data_cfg.val_fraction))
    if len(sequences) - num_val < 1:
        raise UserInputError(
            f"data.paths {data_cfg.paths}: only {len(sequences)} sequences of {data_cfg.seq_len} tokens; "
            "add text or lower data.seq_len"
        )
    return PackedData(sequences[:-num_val], sequences[-num_val:], tokenizer, model_vocab_size)


def _pack(files: list[Path], data_cfg: DataConfig, tokenizer) -> np.ndarray:
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=dtype))
        batch.clear()

    for document in read_documents(files, data_cfg.max_bytes):
        batch.append(document)
        if len(batch) == 64:
            flush()
    flush()
    tokens = np.concatenate(pieces)
    num_sequences = len(tokens) // data_cfg.seq_len
    return tokens[: num_sequences * data_cfg.seq_len].reshape(num_sequences, data_cfg.seq_len)


def _write_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
