"""Ray: `bigmodel launch ray` (ray job submit), the job's driver, Ray Train workers, elastic sizing, stop requests, W&B on the controller."""
