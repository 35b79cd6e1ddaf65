"""One process, no process group: pure functions, config and CLI refusals, scripts against stand-ins, the rules of the code."""
