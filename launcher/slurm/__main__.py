"""`python -m launcher.slurm preflight|exclude ...`: what slurm/pretrain_gpt.sh runs on the batch node (the name
it has always had; the commands live in `batch.py`)."""

import sys

from launcher.slurm.batch import main

sys.exit(main())
