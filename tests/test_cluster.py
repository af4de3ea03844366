"""Issue 32.4: the build on a Ray cluster of two nodes (both on this machine): the encoders run on the second node, the
shards are written there, and the driver, on the head node, receives no embedding."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest

from rot_data import shards
from rot_data.records import load_records
from tests.test_faults import _kill_session

pytestmark = pytest.mark.slow  # two Ray nodes and a build: about a minute on 2 cores


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ports(*names: str) -> list[str]:
    """Ray's per-node ports that have fixed defaults (two nodes on one machine, or another cluster beside, would clash)."""
    return [f"--{name}={_free_port()}" for name in names]


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


# every process of the cluster and its drivers: Ray's token authentication, which `ray start --head` turns on (the
# token is in ~/.ray), is then also on for the worker node and the drivers, which would not turn it on themselves
ENV = dict({k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, RAY_AUTH_MODE="token")

NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 60
while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
print(json.dumps({next(r for r in ("head", "worker_node") if r in n["Resources"]): n["NodeID"] for n in nodes}))
"""


def _start_node(*args: str, tries: int = 2) -> int:
    """`ray start` in a session of its own (returns once the node is up, its processes staying in that session): the
    session id that stops them. A start that fails is tried once more: Ray gives a raylet a fixed 30 s to register
    with the GCS, which a loaded 2-core CI machine has overrun ("The current node timed out during startup")."""
    for attempt in range(1, tries + 1):
        process = subprocess.Popen(["ray", "start", "--disable-usage-stats", "--object-store-memory=300000000", *args],
                                   env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        output = process.communicate(timeout=180)[0]
        if process.returncode == 0:
            return process.pid
        _kill_session(process.pid)
        if attempt == tries:
            raise AssertionError(f"ray start {' '.join(args)} failed {tries} times; the last:\n{output[-3000:]}")


@pytest.fixture
def two_nodes():
    """A head node (2 CPUs, resource 'head') and a worker node (2 CPUs, one GPU as Ray counts it: the only place the
    encoder actors fit, as on a cluster of a CPU head and GPU workers; without a real GPU they encode on its CPU).
    Yields (address, head node id, worker node id); both nodes are stopped, by their sessions, whatever happens."""
    import ray

    if ray.is_initialized():  # the local Ray of earlier in-process builds: its processes would only load the 2 cores
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rot-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    address, sessions = f"127.0.0.1:{_free_port()}", []
    try:
        sessions.append(_start_node("--head", f"--port={address.split(':')[1]}", "--num-cpus=2", "--num-gpus=0",
                                    '--resources={"head": 1}', "--include-dashboard=false", f"--temp-dir={temp}",
                                    *_ports("ray-client-server-port", *NODE_PORTS)))
        sessions.append(_start_node(f"--address={address}", "--num-cpus=2", "--num-gpus=1", '--resources={"worker_node": 1}',
                                    f"--temp-dir={temp}", *_ports(*NODE_PORTS)))
        listed = subprocess.run([sys.executable, "-c", NODES, address], env=ENV, capture_output=True, text=True, timeout=120)
        nodes = json.loads(listed.stdout.strip().splitlines()[-1]) if listed.returncode == 0 else {}
        assert len(nodes) == 2, listed.stdout[-2000:] + listed.stderr[-2000:]
        yield address, nodes["head"], nodes["worker_node"]
    finally:
        for session in sessions:
            _kill_session(session)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_build_on_two_nodes_writes_each_shard_where_it_was_encoded_and_the_driver_gets_no_embedding(two_nodes, tmp_path):
    address, head, worker = two_nodes
    out = tmp_path / "shards"
    result = subprocess.run(["rot-render", "build", "--address", address, "--encoder", "tiny", "--dataset", "gsm8k",
                             "--out", str(out), "--limit", "60", "--shard-size", "20", "--batch-size", "10",
                             "--num-encoders", "1"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 1 encoder, 1 GPU" in result.stdout  # the worker's GPU, as Ray counts it
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert shards.verify(out) == [] and manifest["rows"] == 60
    records, _ = load_records("gsm8k")
    ids = [i for s in manifest["shards"] for i in pq.read_table(out / s["name"], columns=["id"])["id"].to_pylist()]
    assert ids == [r.id for r in records[:60]]
    assert not (out / ".rot-pieces").exists()

    stats = (out / "build-stats.txt").read_text()
    placed = re.findall(r"(shard-\d+\.parquet) written on (\w+); encoded on (.+)", stats)
    assert [name for name, _, _ in placed] == [s["name"] for s in manifest["shards"]]
    assert head != worker
    for name, writer, encoders in placed:  # every row encoded on the worker, and its shard written there
        assert writer == worker and encoders == f"{worker}: 20", (name, writer, encoders)

    received, written = map(int, re.search(r"Driver received (\d+) bytes .* the shards hold (\d+) bytes", stats).groups())
    embedding_bytes = manifest["tokens"] * manifest["embedding"]["dim"] * 2  # bf16
    print(f"driver received {received} bytes for 60 rows; their embeddings are {embedding_bytes} bytes, the shards {written}")
    assert received < 200 * 60 and received < embedding_bytes / 40  # each row's shard, piece and node: no embedding
