"""What the tests share: the spawn harness, the CLI runner, launch and wait helpers (one poll:
waiting.wait_until), Slurm job polling, the ranks' worker functions."""
