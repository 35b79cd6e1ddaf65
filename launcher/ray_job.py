"""`python -m launcher.ray_job`: the Ray entry point users type (`ray job submit ... -- python -m launcher.ray_job
CONFIG`), kept as its name; the job itself lives in `launcher/ray/job.py`."""

import sys

from launcher.ray.job import main

if __name__ == "__main__":
    sys.exit(main())
