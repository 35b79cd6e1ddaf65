"""Fault tolerance: stop requests, progress records and the hang watchdog, loss guards, node health, suspects, injected faults, resize records."""
