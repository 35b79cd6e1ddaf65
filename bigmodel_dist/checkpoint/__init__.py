"""Checkpoints: integrity (metadata, checksums), the manager (save, verified resume, retention), export."""
