"""Entry points: the `bigmodel` command and the launch back-ends that start the one shared trainer."""
