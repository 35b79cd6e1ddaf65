"""The model (built from transformers configs) and its engine (Accelerate + DeepSpeed)."""
