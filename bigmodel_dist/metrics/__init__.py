"""What a run reports: metrics.jsonl and its reader, the logger (progress line, W&B), the start-up clock, the plot."""
