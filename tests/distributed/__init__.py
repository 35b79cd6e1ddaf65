"""Real gloo process groups on real DeepSpeed engines: spawned ranks and `bigmodel launch local`."""
