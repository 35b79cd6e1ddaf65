"""Ground floor: errors, durable file I/O, the environment-variable registry, the run directory, the distributed facts. Imports no other package of the project."""
