"""A real local Ray cluster for tests, confined to loopback.

The head runs in a network namespace that holds only `lo`, so every Ray socket is on 127.0.0.1 (checked
with `ss` after start-up). It is `ray start --head --block` as our child: stopping it terminates that
child and then, by PID, whatever it had started that is still alive. Never `ray stop` or pkill: those
end every Ray process on the machine.

    python -m tests.cluster.ray_cluster start|stop   (by hand; the pytest fixture does the same)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.local.launch import child_pids
from tests.helpers.guards import HANG_GUARD_S

NAMESPACE = "bigmodel-ray"
TEMP_DIR = Path("/tmp/bmray")  # short: Ray's unix socket paths must stay under 108 bytes
STATE_FILE = TEMP_DIR / "cluster.json"
DASHBOARD_PORT = 8265
GCS_PORT = 6380
NUM_CPUS = 6  # logical: two jobs of 2 one-CPU workers at once, with room for their controllers
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def netns_prefix() -> list[str]:
    return ["ip", "netns", "exec", NAMESPACE]


@dataclass
class RayCluster:
    head_pid: int
    address: str = ADDRESS

    def run(self, command: list[str], env: dict[str, str] | None = None, timeout: float = HANG_GUARD_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the cluster's network namespace (where 127.0.0.1 is the head)."""
        return subprocess.run([*netns_prefix(), *command], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)


def job_env() -> dict[str, str]:
    """Environment for `ray job submit` / `bigmodel launch ray` in a test: this interpreter's scripts
    first, quiet W&B, and no RAY_ADDRESS from outside (the tests name the address)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_SILENT"] = "true"
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_binary() -> str:
    return str(Path(sys.executable).parent / "ray")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's daemons, their workers and job drivers)."""
    found, todo = [], [pid]
    while todo:
        for child in child_pids(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _dashboard_up() -> bool:
    probe = f"import urllib.request; urllib.request.urlopen('{ADDRESS}/api/version', timeout=2)"
    result = subprocess.run([*netns_prefix(), sys.executable, "-c", probe], capture_output=True)
    return result.returncode == 0


def listening_sockets() -> list[str]:
    """Local addresses of every listening TCP socket in the namespace (`ss -ltnH`)."""
    out = subprocess.run([*netns_prefix(), "ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def start(timeout_s: float = HANG_GUARD_S) -> RayCluster:
    if os.geteuid() != 0:
        raise RuntimeError("the local Ray cluster needs root (it creates a network namespace)")
    stop()  # a cluster left by a killed session
    if not (shutil.which("ip") and shutil.which("ss")):  # a bare machine: iproute2 has both
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "-q", "update"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "-q", "-y", "install", "--no-install-recommends", "iproute2"], check=True, env=env,
                       capture_output=True)
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    subprocess.run([*netns_prefix(), "ip", "link", "set", "lo", "up"], check=True)
    TEMP_DIR.mkdir(parents=True, exist_ok=True)
    log = open(TEMP_DIR / "head.log", "w")
    # No pre-started idle workers: on 2 cores their start-up competes with the first job's.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_num_prestart_python_workers": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [*netns_prefix(), _ray_binary(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
         f"--num-cpus={NUM_CPUS}", "--num-gpus=0", "--object-store-memory=200000000",
         f"--temp-dir={TEMP_DIR}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    STATE_FILE.write_text(json.dumps({"head_pid": head.pid}))
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up():
        if head.poll() is not None or time.monotonic() > deadline:
            tail = (TEMP_DIR / "head.log").read_text()[-2000:]
            stop()
            raise RuntimeError(f"Ray head did not come up (exit {head.poll()}):\n{tail}")
        time.sleep(1)
    return RayCluster(head.pid)


# `ray start --block` ends its daemons on TERM; what is still alive after this grace gets KILL. Not a
# wait for an event: either way the cluster ends stopped, on a slow machine by KILL.
TERM_GRACE_S = 5.0


def stop() -> None:
    """Terminate the head we started and every process it left, by PID; remove the namespace."""
    if STATE_FILE.is_file():
        head_pid = json.loads(STATE_FILE.read_text())["head_pid"]
        tree = [head_pid, *_descendants(head_pid)]
        _signal_all(tree, signal.SIGTERM)
        grace_ends = time.monotonic() + TERM_GRACE_S
        while time.monotonic() < grace_ends and any(_alive(pid) for pid in tree):
            _reap(head_pid)
            time.sleep(0.5)
        _signal_all([*tree, *_descendants(head_pid)], signal.SIGKILL)
        _reap(head_pid)
        STATE_FILE.unlink()
    if NAMESPACE in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)
    shutil.rmtree(TEMP_DIR / "session_latest", ignore_errors=True)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def start_node(resources: dict[str, float], num_cpus: int = 1, timeout_s: float = HANG_GUARD_S) -> subprocess.Popen:
    """Another Ray node joining the head (same namespace, its own raylet), advertising `resources`;
    returns once the head counts it. Stop it with `kill_node`: it is not below the head's PID."""
    before = _alive_resources()
    # Its own temp dir: raylets sharing one would share runtime_resources/, where each node's runtime-env
    # agent deletes working-dir copies it no longer needs, also those another node's driver runs in.
    temp_dir = Path(tempfile.mkdtemp(prefix="bmn", dir="/tmp"))  # short: unix socket paths
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_num_prestart_python_workers": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    node = subprocess.Popen(
        [*netns_prefix(), _ray_binary(), "start", f"--address=127.0.0.1:{GCS_PORT}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
         "--object-store-memory=100000000", f"--temp-dir={temp_dir}", "--block", "--disable-usage-stats"],
        stdout=open(temp_dir / "node.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node.temp_dir = temp_dir  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    wanted = {name.replace("_", "").lower(): before.get(name.replace("_", "").lower(), 0.0) + amount
              for name, amount in resources.items()}
    while any(_alive_resources().get(key, 0.0) < amount for key, amount in wanted.items()):
        if node.poll() is not None or time.monotonic() > deadline:
            kill_node(node)
            raise RuntimeError(f"Ray node did not join (exit {node.poll()})")
        time.sleep(0.5)
    return node


def kill_node(node: subprocess.Popen) -> None:
    """The node dies as a machine would: SIGKILL to its raylet, its workers and every other process of it."""
    _signal_all([node.pid, *_descendants(node.pid)], signal.SIGKILL)
    node.wait()
    shutil.rmtree(getattr(node, "temp_dir", ""), ignore_errors=True)


def _alive_resources() -> dict[str, float]:
    """Resources of the live nodes, summed, keyed in lower case without underscores (empty when the
    dashboard does not answer)."""
    probe = ("import json, urllib.request; nodes = json.load(urllib.request.urlopen("
             f"'{ADDRESS}/nodes?view=summary', timeout=5)); "
             "print(json.dumps([n['raylet']['resourcesTotal'] for n in nodes['data']['summary'] "
             "if n['raylet']['state'] == 'ALIVE']))")
    result = subprocess.run([*netns_prefix(), sys.executable, "-c", probe], capture_output=True, text=True)
    total: dict[str, float] = {}
    for node in json.loads(result.stdout) if result.returncode == 0 else []:
        for name, amount in node.items():  # the dashboard spells them in camelCase: elastic_slot -> elasticSlot
            key = name.replace("_", "").lower()
            total[key] = total.get(key, 0.0) + amount
    return total


def worker_pids(head_pid: int) -> list[int]:
    """PIDs of the Ray Train worker actors under our head (their title is ray::RayTrainWorker...)."""
    found = []
    for pid in _descendants(head_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::RayTrainWorker"):
            found.append(pid)
    return found


if __name__ == "__main__":
    if sys.argv[1:] == ["start"]:
        cluster = start()
        print(f"Ray head pid {cluster.head_pid}; submit with: ip netns exec {NAMESPACE} ray job submit "
              f"--address {ADDRESS} ...; listening: {listening_sockets()}")
    elif sys.argv[1:] == ["stop"]:
        stop()
    else:
        sys.exit("usage: python -m tests.cluster.ray_cluster start|stop")
