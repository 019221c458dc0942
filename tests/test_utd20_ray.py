"""benchmarks.utd20 --ray: units as Ray tasks on a local Ray instance, a killed worker resumes its unit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "smoke", "--envs", "Pendulum-v1", "--arms", "sac_utd1", "sac_utd20", "--seeds", "2",
        "--total-steps", "300", "--heartbeat", "60"]
VICTIM = Path("Pendulum-v1") / "sac_utd20" / "seed1"


def _checkpoint_step(unit: Path):
    try:
        return json.loads((unit / "checkpoint" / "run.json").read_text())["env_steps"]
    except (OSError, ValueError, KeyError):
        return None


def _run_killing_victim(out: Path, kill_parent: bool, *extra: str) -> str:
    """Run the benchmark; when the victim unit's first checkpoint (env step 100) lands, SIGKILL its script
    (local) or the Ray worker running it (``kill_parent``). Returns the benchmark's output."""
    cmd = [sys.executable, "-m", "benchmarks.utd20", *ARGS, "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS=""))
    killed, deadline = False, time.time() + 900   # generous: on a loaded machine a unit takes minutes
    while proc.poll() is None and not killed and time.time() < deadline:
        if _checkpoint_step(out / VICTIM) == 100:
            pid = json.loads((out / VICTIM / "running.json").read_text())["pid"]
            if kill_parent:   # the Ray worker: its child (the script) gets SIGTERM through PR_SET_PDEATHSIG
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert pid not in (1, os.getpid(), proc.pid), pid   # a unit's own process, nothing above it
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=300)
    assert killed, output
    return output


def _finals(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["final_eval"]["mean_return"]
            for p in out.glob("*/*/seed*/results.json")}


@pytest.mark.timeout(2400)
def test_ray_campaign_resumes_a_killed_worker_and_matches_a_local_run(tmp_path):
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    log = _run_killing_victim(ray_out, True, "--ray", "--max-retries", "2")
    assert "resuming from its checkpoint at env step 100" in log, log
    assert "all units processed" in log and "0 failed" in log, log
    assert "(resumed at env step 100)" in (ray_out / VICTIM / "stdout.log").read_text()
    assert sorted(json.loads((ray_out / "summary.json").read_text())["units"], key=str) and \
        len(_finals(ray_out)) == 4

    # The same interruption without Ray: the killed unit fails, a rerun resumes it from the same checkpoint.
    log1 = _run_killing_victim(local_out, False)
    assert "FAILED Pendulum-v1/sac_utd20/seed1" in log1, log1
    r = subprocess.run([sys.executable, "-m", "benchmarks.utd20", *ARGS, "--out", str(local_out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "resuming from its checkpoint at env step 100" in r.stdout, r.stdout + r.stderr
    assert _finals(ray_out) == _finals(local_out)


def _blind_probe(path: str):
    return "blind-node", False


def test_ray_refuses_an_out_path_some_node_cannot_see(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks import utd20

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers can't import this test file
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        utd20.check_shared_path(tmp_path)                     # two nodes on one filesystem: fine
        assert not list(tmp_path.iterdir())                   # the probe file is cleaned up
        with pytest.raises(RuntimeError, match="not visible on 2 of 2 Ray nodes: blind-node"):
            utd20.check_shared_path(tmp_path, probe=_blind_probe)
        assert not list(tmp_path.iterdir())
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_without_an_address_starts_its_own_instance(monkeypatch):
    """``--ray`` with no address must start a new local instance, never join a cluster already running on
    this machine (a stale one left by a killed process hung a campaign that joined it)."""
    import ray

    import benchmarks.utd20 as U

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    U.ray_connect(None, num_cpus=2)
    U.ray_connect("local")
    U.ray_connect("auto")
    assert [c.get("address") for c in calls] == ["local", "local", "auto"]
    assert calls[0]["num_cpus"] == 2
