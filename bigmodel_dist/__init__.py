"""bigmodel-dist: one trainer for GPT-style pretraining on DeepSpeed ZeRO, from one machine to many nodes."""

__version__ = "0.1.0"
