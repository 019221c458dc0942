"""The cross-node paths on a two-node ``ray.cluster_utils.Cluster`` (both nodes on this machine): a retrain actor
placed on the other node by a custom resource, shards spread over both nodes, a node that cannot see the output."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("h5py")

from synther_buffer import GenerativeReplay, TransitionDiffusion, distributed, offline  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small, transitions  # noqa: E402
from test_offline import make_transitions, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + a second node (1 CPU and a custom ``diffusion`` resource); this process joins it."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        second = c.add_node(num_cpus=1, resources={"diffusion": 1})
        ray.init(address=c.address)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            yield {"head": c.head_node.node_id, "second": second.node_id}
        finally:
            gc.collect()
            ray.shutdown()
    finally:
        c.shutdown()


def test_the_retrain_actor_runs_on_the_node_with_the_resource(cluster, tiny_cfg):
    fields = transitions(100, seed=5)
    bufs = {}
    for backend in ("thread", "ray"):
        buf = GenerativeReplay(3, 2, capacity=1000, config=small(tiny_cfg, retrain_backend=backend),
                               model_terminals=False)
        if backend == "ray":
            buf.pool.set_ray_actor_options(num_cpus=1, resources={"diffusion": 1})
        buf.add(*fields)
        bufs[backend] = buf
    r, t = bufs["ray"], bufs["thread"]
    where = ray.get(r.pool.remote.actor.where.remote())
    assert where["node_id"] == cluster["second"] != ray.get_runtime_context().get_node_id()
    assert r.stats()["retrain_count"] == 1 and r.stats()["failed_retrains"] == 0
    torch.testing.assert_close(r.pool.pool, t.pool.pool, rtol=0, atol=0)   # rows there, pool back, bit for bit


def test_shards_spread_over_both_nodes_and_write_the_local_output(cluster, tmp_path):
    data = make_transitions(terminal_every=10)
    kw = dict(num_samples=96, chunk_size=16, seed=4, mix=0.25, config=tiny_config(), train_steps=100, progress=False,
              write_json=False)
    offline.upsample(data, tmp_path / "local.npz", **kw)
    s = offline.upsample(data, tmp_path / "two.npz", workers=2, **kw)
    assert s["ray"]["nodes"] == 2 and not s["ray"]["local_instance"]
    assert {sh["node_id"] for sh in s["shards"]} == {cluster["head"], cluster["second"]}
    a, b = np.load(tmp_path / "local.npz"), np.load(tmp_path / "two.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _blind_on_second(path: str):
    import os
    import socket

    node = ray.get_runtime_context().get_node_id()
    return f"{socket.gethostname()}-{node[:6]}", os.path.exists(path) and node == _HEAD[0]


_HEAD: list = []


def test_a_node_that_cannot_see_the_output_is_named_before_training(cluster, tmp_path, monkeypatch):
    _HEAD[:] = [cluster["head"]]
    monkeypatch.setattr(distributed, "_node_sees", _blind_on_second)
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=rf"not visible on 1 of 2 Ray nodes: .*-{cluster['second'][:6]}"):
        offline.upsample(make_transitions(), tmp_path / "o.npz", num_samples=10, config=tiny_config(), workers=2,
                         progress=False)
    assert list(tmp_path.iterdir()) == []       # the probe file is gone, nothing written
