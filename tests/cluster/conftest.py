"""One Ray head for every Ray test module of this package (started at first use, stopped after the
package's last test): each start and stop costs ~10 s, and the Ray modules run one after another."""

from tests.cluster.fixtures import ray_cluster  # noqa: F401
