"""A run resolved before any process starts: config + world size -> batch layout, DeepSpeed JSON, precision (resolve); memory and step-time plans (planner)."""
