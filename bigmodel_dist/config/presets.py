"""Architecture presets (GPT-2 and Llama families) and the arithmetic on them that needs no torch.

Each preset is a family name plus the keyword arguments of that family's `transformers` config, so a
model is built locally from a config: nothing is downloaded. Parameter counts and FLOPs are computed
from the same numbers (tests check them against the built models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The few numbers that size a decoder-only transformer."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    intermediate_size: int = 0  # Llama MLP width; GPT-2 uses 4 * hidden
    num_kv_heads: int = 0  # Llama grouped-query attention; 0 = num_heads
    tie_embeddings: bool = True


def _gpt2(vocab: int, layers: int, heads: int, hidden: int, positions: int) -> dict[str, Any]:
    return {
        "family": "gpt2",
        "config": {"vocab_size": vocab, "n_layer": layers, "n_head": heads, "n_embd": hidden, "n_positions": positions},
    }


def _llama(vocab: int, layers: int, heads: int, hidden: int, intermediate: int, positions: int) -> dict[str, Any]:
    return {
        "family": "llama",
        "config": {
            "vocab_size": vocab,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "max_position_embeddings": positions,
            "tie_word_embeddings": False,
        },
    }


# Sizes follow GPT-2 / GPT-3 (124M, 350M, 1.3B, 6.7B) and Llama-style shapes of similar size.
# Real vocabularies are padded to a multiple of 64 (50257 -> 50304) for faster matmuls.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": _gpt2(vocab=512, layers=2, heads=4, hidden=128, positions=1024),
    "gpt2-mini": _gpt2(vocab=8192, layers=4, heads=4, hidden=256, positions=1024),
    "gpt2-24m": _gpt2(vocab=8192, layers=6, heads=8, hidden=512, positions=1024),
    "gpt2-124m": _gpt2(vocab=50304, layers=12, heads=12, hidden=768, positions=1024),
    "gpt2-350m": _gpt2(vocab=50304, layers=24, heads=16, hidden=1024, positions=1024),
    "gpt2-1.3b": _gpt2(vocab=50304, layers=24, heads=16, hidden=2048, positions=2048),
    "gpt2-7b": _gpt2(vocab=50304, layers=32, heads=32, hidden=4096, positions=2048),
    "llama-tiny": _llama(vocab=512, layers=2, heads=4, hidden=128, intermediate=352, positions=1024),
    "llama-124m": _llama(vocab=32000, layers=12, heads=12, hidden=768, intermediate=2048, positions=2048),
    "llama-350m": _llama(vocab=32000, layers=24, heads=16, hidden=1024, intermediate=2816, positions=2048),
    "llama-1.3b": _llama(vocab=32000, layers=24, heads=16, hidden=2048, intermediate=5504, positions=2048),
    "llama-7b": _llama(vocab=32000, layers=32, heads=32, hidden=4096, intermediate=11008, positions=4096),
}


def preset_kwargs(preset: str, vocab_size: int | None = None, dropout: float | None = None) -> tuple[str, dict]:
    """(family, transformers config kwargs) for a preset with the run's overrides applied."""
    entry = MODEL_PRESETS[preset]
    kwargs = dict(entry["config"])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if dropout is not None:
        if entry["family"] == "gpt2":
            kwargs.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        else:
            kwargs["attention_dropout"] = dropout
    return entry["family"], kwargs


def model_shape(preset: str, vocab_size: int | None = None) -> ModelShape:
    family, kw = preset_kwargs(preset, vocab_size)
    if family == "gpt2":
        return ModelShape("gpt2", kw["vocab_size"], kw["n_embd"], kw["n_layer"], kw["n_head"], kw["n_positions"])
    return ModelShape(
        "llama",
        kw["vocab_size"],
        kw["hidden_size"],
        kw["num_hidden_layers"],
        kw["num_attention_heads"],
        kw["max_position_embeddings"],
        intermediate_size=kw["intermediate_size"],
        num_kv_heads=kw["num_key_value_heads"],
        tie_embeddings=kw["tie_word_embeddings"],
    )


def count_parameters(shape: ModelShape) -> int:
    """Exact trainable parameter count of the `transformers` model built from this shape."""
    d, n_layers, vocab = shape.hidden_size, shape.num_layers, shape.vocab_size
    if shape.family == "gpt2":
        # per block: qkv (3d^2+3d), attn proj (d^2+d), MLP (8d^2+5d), two LayerNorms (4d)
        per_layer = 12 * d * d + 13 * d
        return vocab * d + shape.max_positions * d + n_layers * per_layer + 2 * d
    head_dim = d // shape.num_heads
    kv_dim = (shape.num_kv_heads or shape.num_heads) * head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * shape.intermediate_size + 2 * d
    lm_head = 0 if shape.tie_embeddings else vocab * d
    return vocab * d + n_layers * per_layer + d + lm_head


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention scores (PaLM appendix B)."""
    return 6 * count_parameters(shape) + 12 * shape.num_layers * shape.hidden_size * seq_len
