"""`bigmodel launch local`: torchrun on this machine (or one node of several), its supervisor and hang watchdog."""
