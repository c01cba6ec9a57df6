"""A three-node Ray cluster on this machine (every node on 127.0.0.1): a worker node removed mid-job."""

import shutil
import threading
import time

import pytest
from support import SHARED

import os
import signal
import sys
from pathlib import Path

import protext.distributed as distributed
from protext.classifier import ProTextClassifier
from protext.context import QUIET, Context
from protext.distributed import PartWorker, label_on_ray
from protext.inputs import collect, open_inputs
from protext.label import label

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ["airplane", "cat", "frog", "ship"]


class Recorded(PartWorker):
    """A worker that notes the node it starts on (in the file $PROTEXT_TEST_STARTS)."""

    def __init__(self, *args):
        with open(os.environ["PROTEXT_TEST_STARTS"], "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")
        super().__init__(*args)


def crash(node) -> None:
    """Kill a node's worker processes at once, as a machine that dies takes them (removing a node on
    one machine stops its raylet, whose workers would otherwise finish what they hold)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and int(fields[1]) == raylet:  # its parent is the raylet
            os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture
def three_nodes(monkeypatch):
    """A head (no CPUs: it only schedules) and two worker nodes of 2 CPUs, all on 127.0.0.1."""
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(services, "get_node_ip_address", lambda *args, **kwargs: "127.0.0.1")
    monkeypatch.setenv("RAY_NODE_IP_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("RAY_worker_niceness", "0")  # as distributed.connect: workers not starved by other programs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_a_node_removed_mid_job_loses_nothing_and_labels_every_image_once(three_nodes, prompts_dir, tmp_path,
                                                                            monkeypatch):
    cluster, nodes = three_nodes
    monkeypatch.setattr(distributed, "PartWorker", Recorded)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"} and len(ray.nodes()) == 3
    clf = ProTextClassifier.from_prompts(prompts_dir, CLASSES, Context(tmp_path / "c", "cpu"))
    sources = collect([SHARED / "images" / "cifar10_test_sample"])
    (tmp_path / "imgs").mkdir()
    paths = []
    for i in range(240):  # 30 parts of 8
        paths.append(str(tmp_path / "imgs" / f"{i:03d}.png"))
        shutil.copy(sources[i % len(sources)], paths[-1])
    pq.write_table(pa.table({"path": paths, "n": list(range(len(paths)))}), tmp_path / "m.parquet")
    manifest = open_inputs([tmp_path / "m.parquet"], 8)
    out = tmp_path / "ray"
    removed = threading.Event()
    at_removal = []

    def remove_a_node_once_parts_appear() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
            time.sleep(0.05)
        at_removal.append(len(list(out.glob("part-*.parquet"))))
        crash(nodes[0])
        cluster.remove_node(nodes[0], allow_graceful=False)  # its actors' calls are retried on the other node
        removed.set()

    killer = threading.Thread(target=remove_a_node_once_parts_appear)
    killer.start()
    report = label_on_ray(clf, manifest, out=out, part_size=8, workers=2, batch_size=4, ctx=QUIET,
                          runtime_env={"env_vars": {"PROTEXT_TEST_STARTS": str(tmp_path / "starts")}})
    killer.join()
    assert removed.is_set() and at_removal[0] < 30  # removed while parts were still to come
    deadline = time.time() + 60
    while sum(n["Alive"] for n in ray.nodes()) != 2 and time.time() < deadline:
        time.sleep(0.5)  # the head notices a dead node after its health checks
    assert sum(n["Alive"] for n in ray.nodes()) == 2
    starts = (tmp_path / "starts").read_text().split()
    assert len(starts) >= 3 and len(set(starts)) == 2  # 2 actors on 2 nodes, one started again on the other
    assert report.processed == len(paths)
    got = pq.read_table(out)
    assert sorted(got.column("path").to_pylist()) == sorted(paths) and got.num_rows == len(paths)  # each once
    label(clf, manifest, out=tmp_path / "one", part_size=8, ctx=QUIET)  # an uninterrupted run
    for i in range(30):
        a = pq.read_table(out / f"part-{i:06d}.parquet")
        b = pq.read_table(tmp_path / "one" / f"part-{i:06d}.parquet")
        assert a.column("path").to_pylist() == b.column("path").to_pylist()
        assert a.column("top_labels").to_pylist() == b.column("top_labels").to_pylist()
        assert a.column("n").to_pylist() == b.column("n").to_pylist()
        for x, y in zip(a.column("top_probs").to_pylist(), b.column("top_probs").to_pylist()):
            assert x == pytest.approx(y, abs=2e-6)
