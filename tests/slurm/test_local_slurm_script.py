"""scripts/local_slurm.sh itself: N nodes in their own namespaces, nothing added to the machine's network, `stop`
removes exactly what `start` made, and DIRs another user could have prepared are refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from slurm_helpers import REPO, SLURM_TOOLS

pytestmark = pytest.mark.slurm
SCRIPT = str(REPO / "scripts" / "local_slurm.sh")


@pytest.fixture(autouse=True)
def _needs_slurm_and_root():
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM packages not installed (missing {', '.join(missing)}): run .ci/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")


def script(*args: str, nodes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCAL_SLURM_NODES": str(nodes), "LOCAL_SLURM_CPUS": "1"}
    return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)


def host_network() -> list:
    """The machine's own links and addresses (the test's network namespace)."""
    links = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    return sorted((link["ifname"], sorted(a["local"] for a in link.get("addr_info", []))) for link in links)


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())


def test_two_nodes_in_their_own_namespaces_and_stop_removes_them(tmp_path):
    directory = tmp_path / "cluster"
    network_before = host_network()
    started = script("start", str(directory))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert f"export SLURM_CONF={directory}/slurm.conf" in started.stdout
        assert f"export PATH={directory}/bin:$PATH" in started.stdout
        made = set((directory / "netns").read_text().split())
        assert len(made) == 3 and made <= namespaces()  # the controller's and one per node
        assert host_network() == network_before  # no link or address on the machine itself
        env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"),
               "PATH": f"{directory}/bin:{os.environ['PATH']}"}
        step = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "-l", "sh", "-c",
                               "echo $(hostname) $(ip -br -4 addr show eth0 | tr -s ' ' | cut -d' ' -f3)"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert step.returncode == 0, step.stderr
        # Each task ran on its node: own hostname (UTS namespace), own address (network namespace).
        assert sorted(step.stdout.split("\n")[:2]) == ["0: node1 10.233.0.2/24", "1: node2 10.233.0.3/24"], step.stdout
        pids = [int(pid) for pid in (directory / "pids").read_text().split()]
    finally:
        stopped = script("stop", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert not made & namespaces() and host_network() == network_before  # (other clusters may come and go)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), pid


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_dir_others_can_write_is_refused(tmp_path, mode):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    result = script("start", str(directory))
    assert result.returncode != 0 and "writable by others" in result.stderr, result.stderr
    assert list(directory.iterdir()) == []  # nothing started, nothing written


def test_a_dir_of_another_user_is_refused(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    result = script("stop", str(directory))
    assert result.returncode == 0  # no cluster recorded there: nothing to do
    (directory / "netns").write_text("lsl-x-ctl\n")
    result = script("stop", str(directory))
    assert result.returncode != 0 and "belongs to uid 65534" in result.stderr, result.stderr


def test_a_bad_node_count_is_refused(tmp_path):
    result = script("start", str(tmp_path / "c"), nodes="two")  # type: ignore[arg-type]
    assert result.returncode != 0 and "LOCAL_SLURM_NODES=two" in result.stderr
