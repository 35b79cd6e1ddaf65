"""Training data: a text corpus, a local tokenizer, packed fixed-length sequences, per-rank batches."""
