"""A fast tokenizer from a local folder, or a byte-level BPE trained on the corpus (no hub download)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(folder: str | Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = EOS_TOKEN if EOS_TOKEN in tokenizer.get_vocab() else tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE (GPT-2 style) and save it as a transformers tokenizer folder, atomically."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN)
    save_tokenizer_atomically(tokenizer, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer_atomically(tokenizer, folder: Path) -> None:
    """Save into a temp folder, then rename: a reader never sees half a tokenizer."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another rank or node put an identical one there first
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the full tokenizer definition: same ids for the same text iff equal."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
