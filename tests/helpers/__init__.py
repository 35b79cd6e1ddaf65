"""What the tests share: the spawn harness, the CLI runner, launch and wait helpers, the ranks' worker functions."""
