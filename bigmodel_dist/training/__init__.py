"""The training loop and what only it uses: set-up as build functions, resume and rollback, hooks, lr schedule, evaluation, per-window metrics, the session that runs it."""
