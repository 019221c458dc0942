"""upsample(workers=N) / synther upsample --workers N on a local Ray instance: sharding, a killed shard, failures."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
h5py = pytest.importorskip("h5py")

from synther_buffer import TransitionDiffusion, cli, distributed, offline  # noqa: E402
from synther_buffer.datasets import load_transitions, to_rows  # noqa: E402
from synther_buffer.extras import MissingExtraError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_offline import make_transitions, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for the module; this file's functions travel to workers by value."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data() -> dict:
    return make_transitions(terminal_every=10)


@pytest.fixture(scope="module")
def fitted(data):
    rows, layout = to_rows(data)
    model = offline.make_model(layout, rows.shape[1], tiny_config())
    model.fit(rows)
    return model


def read(path: Path) -> dict:
    if path.suffix == ".npy":
        return {"rows": np.load(path)}
    return load_transitions(path)


def assert_same_file(a: Path, b: Path) -> None:
    ga, gb = read(a), read(b)
    assert sorted(ga) == sorted(gb)
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


KW = dict(num_samples=203, chunk_size=16, seed=5, progress=False, write_json=False)


@pytest.mark.parametrize("suffix,mix,bounds", [(".npz", 0.3, None), (".hdf5", 0.5, (-0.5, 0.5)), (".npy", 0.0, None)])
def test_every_worker_count_writes_the_in_process_output(ray_local, tmp_path, data, fitted, suffix, mix, bounds):
    ref = offline.upsample(data, tmp_path / f"local{suffix}", model=fitted, mix=mix, action_bounds=bounds, **KW)
    n_synth = ref["num_synthetic"]
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}{suffix}"
        s = offline.upsample(data, out, model=fitted, mix=mix, action_bounds=bounds, workers=workers, **KW)
        assert_same_file(tmp_path / f"local{suffix}", out)
        assert len(read(out)[next(iter(read(out)))]) == 203
        assert s["workers"] == workers and len(s["shards"]) == workers
        # contiguous chunk ranges covering all 13 chunks, synthetic rows adding up
        assert [sh["chunks"] for sh in s["shards"]][0][0] == 0 and s["shards"][-1]["chunks"][1] == s["chunks"] == 13
        assert all(a["chunks"][1] == b["chunks"][0] for a, b in zip(s["shards"], s["shards"][1:]))
        assert sum(sh["rows"] for sh in s["shards"]) == n_synth
        assert all(sh["attempt"] == 1 and sh["seconds"] >= sh["sample_seconds"] >= 0 for sh in s["shards"])
        assert s["synthetic_actions_outside_real_range"] == ref["synthetic_actions_outside_real_range"]
        assert s["synthetic_actions_clipped"] == ref["synthetic_actions_clipped"]
        assert s["ray"]["gpus_per_worker"] == 0 and not s["ray"]["local_instance"]   # the fixture's instance
    assert leftovers(tmp_path) == []      # part files and their directory are gone


def test_more_workers_than_chunks_uses_one_task_per_chunk(ray_local, tmp_path, data, fitted):
    s = offline.upsample(data, tmp_path / "o.npz", model=fitted, workers=4, num_samples=20, chunk_size=8,
                         progress=False, write_json=False)
    assert s["chunks"] == 3 and [sh["chunks"] for sh in s["shards"]] == [[0, 1], [1, 2], [2, 3]]
    assert len(load_transitions(tmp_path / "o.npz")["rewards"]) == 20


# ---------------------------------------------------------------------------------------- faults
class KillOnSecondChunk:
    """Wraps the shard's SyntheticSpec: on its second chunk the first attempt SIGKILLs its own Ray worker
    (after one chunk is already in the part file), leaving ``marker`` behind; a rerun goes through."""

    def __init__(self, spec, marker: str, test_pid: int):
        self.spec, self.marker, self.calls = spec, marker, 0
        self.test_pid = test_pid   # the test run's process: never the one to kill

    def generate(self, model, chunk, n):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            if os.getpid() == self.test_pid:   # never SIGKILL the test run itself
                raise AssertionError("the shard ran in the test process, not in a Ray worker")
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.spec.generate(model, chunk, n)


def faulty_shards(monkeypatch, victim: int, wrap) -> None:
    """Make the driver launch ``wrap(spec)`` in place of shard ``victim``'s spec."""
    real = distributed.generate_shard

    def shard_fn(state, shard, plan, spec, parts_dir, use_gpu):
        return real(state, shard, plan, wrap(spec) if shard == victim else spec, parts_dir, use_gpu)

    monkeypatch.setattr(distributed, "generate_shard", shard_fn)


def test_a_killed_shard_is_rerun_and_the_output_equals_one_worker(ray_local, tmp_path, data, fitted, monkeypatch):
    kw = dict(KW, mix=0.3, model=fitted)
    one = offline.upsample(data, tmp_path / "one.npz", workers=1, **kw)
    marker, test_pid = tmp_path / "killed", os.getpid()   # the pid read here, in the test process
    faulty_shards(monkeypatch, 1, lambda spec: KillOnSecondChunk(spec, str(marker), test_pid))
    s = offline.upsample(data, tmp_path / "two.npz", workers=2, **kw)
    assert marker.exists(), "the shard was never killed"
    assert int(marker.read_text()) != os.getpid()                  # a Ray worker died, not this process
    assert [sh["attempt"] for sh in s["shards"]] == [1, 2]
    assert s["shards"][1]["pid"] != int(marker.read_text())        # the rerun ran in a new worker
    assert_same_file(tmp_path / "one.npz", tmp_path / "two.npz")
    assert (s["num_real"], s["num_synthetic"]) == (one["num_real"], one["num_synthetic"])
    assert leftovers(tmp_path) == []


class Raises:
    def __init__(self, spec):
        self.spec = spec

    def generate(self, model, chunk, n):
        raise ValueError("injected shard failure")


def _never_answers(path: str):
    import time

    time.sleep(600)
    return "never", True


def test_a_node_that_does_not_answer_the_shared_dir_check_is_a_named_timeout(ray_local, tmp_path):
    with pytest.raises(TimeoutError, match=r"1 of 1 Ray nodes did not answer .* within 1 s .*: \S+"):
        distributed.check_shared_dir(tmp_path, timeout_s=1, probe=_never_answers)
    assert list(tmp_path.iterdir()) == []       # the probe file is gone


@pytest.mark.parametrize("suffix", [".npz", ".hdf5", ".npy"])
def test_a_failed_shard_leaves_no_output(ray_local, tmp_path, data, fitted, monkeypatch, suffix):
    faulty_shards(monkeypatch, 1, Raises)
    out = tmp_path / f"o{suffix}"
    with pytest.raises(Exception, match="injected shard failure"):
        offline.upsample(data, out, model=fitted, workers=2, **KW)
    assert list(tmp_path.iterdir()) == []     # no output, no .tmp, no part directory


class SlowChunks:
    """Wraps a shard's spec: one second per chunk, each chunk logged as a line of ``log``."""

    def __init__(self, spec, log: str):
        self.spec, self.log = spec, log

    def generate(self, model, chunk, n):
        import time

        time.sleep(1.0)
        with open(self.log, "a") as f:
            f.write(f"{chunk}\n")
        return self.spec.generate(model, chunk, n)


def test_a_failed_shard_stops_the_others_without_ray_cancel(ray_local, tmp_path, data, fitted, monkeypatch):
    """Shard 0 fails at once; shard 1 (7 chunks of a second each) stops before its next chunk once the abort
    file appears, and the driver never calls ray.cancel (which can abort it: Ray 2.60's cancel race)."""
    log = tmp_path / "chunks.log"
    real = distributed.generate_shard

    def shard_fn(state, shard, plan, spec, parts_dir, use_gpu):
        wrapped = Raises(spec) if shard == 0 else SlowChunks(spec, str(log))
        return real(state, shard, plan, wrapped, parts_dir, use_gpu)

    monkeypatch.setattr(distributed, "generate_shard", shard_fn)
    monkeypatch.setattr(ray, "cancel", lambda *a, **k: pytest.fail("ray.cancel called"))
    out = tmp_path / "o.npz"
    with pytest.raises(Exception, match="injected shard failure"):
        offline.upsample(data, out, model=fitted, workers=2, **KW)
    done = log.read_text().split() if log.exists() else []
    assert len(done) < 6, done                  # shard 1's plan is chunks 6-12: it stopped early
    assert sorted(p.name for p in tmp_path.iterdir()) == (["chunks.log"] if done else [])   # no parts, no output


def test_a_failure_while_the_shards_start_leaves_no_output(ray_local, tmp_path, data, fitted, monkeypatch):
    """Ctrl-C (or a full object store) while the model goes to the object store: nothing stays behind."""
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        offline.upsample(data, tmp_path / "o.hdf5", model=fitted, workers=2, **KW)
    monkeypatch.setattr(ray, "put", real_put)
    assert list(tmp_path.iterdir()) == []     # no output, no .tmp, no part directory


def test_a_killed_shard_past_its_retries_fails_cleanly(ray_local, tmp_path, data, fitted, monkeypatch):
    marker, test_pid = tmp_path / "killed", os.getpid()   # the pid read here, in the test process
    faulty_shards(monkeypatch, 0, lambda spec: KillOnSecondChunk(spec, str(marker), test_pid))
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        offline.upsample(data, tmp_path / "o.npz", model=fitted, workers=2, max_retries=0, **KW)
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,match", [
    (dict(workers=0), "workers must be"), (dict(workers=True), "workers must be"),
    (dict(workers=1.5), "workers must be"),
    (dict(ray_address="auto"), "ray_address needs workers"), (dict(workers=2, cpus_per_worker=0), "cpus_per_worker"),
    (dict(workers=2, max_retries=-1), "max_retries")])
def test_bad_worker_arguments_are_refused_before_training(tmp_path, data, monkeypatch, kw, match):
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=match):
        offline.upsample(data, tmp_path / "o.npz", num_samples=10, config=tiny_config(), progress=False, **kw)
    assert list(tmp_path.iterdir()) == []


def test_workers_without_ray_names_the_extra_before_training(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(MissingExtraError, match=r"synther-buffer\[distributed\]") as e:
        offline.upsample(data, tmp_path / "o.npz", num_samples=10, config=tiny_config(), workers=2, progress=False)
    assert e.value.extra == "distributed"
    assert list(tmp_path.iterdir()) == []


def test_cli_workers_end_to_end(ray_local, tmp_path, data, capsys):
    np.savez(tmp_path / "real.npz", **data)
    args = ["upsample", str(tmp_path / "real.npz"), "--num-samples", "60", "--chunk-size", "16", "--seed", "2",
            "--device", "cpu", "--preset", "tiny", "--train-steps", "50", "--quiet", "--mix", "0.5"]
    assert cli.main(args + ["--out", str(tmp_path / "local.npz")]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--out", str(tmp_path / "ray.npz"), "--workers", "2", "--cpus-per-worker", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 Ray workers" in text and "over 2 Ray tasks" in text
    assert "shard 0: chunks 0-1" in text and "shard 1: chunks 2-3" in text
    assert_same_file(tmp_path / "local.npz", tmp_path / "ray.npz")
    js = json.loads((tmp_path / "ray.compression.json").read_text())
    assert js["workers"] == 2 and len(js["shards"]) == 2 and js["num_samples"] == 60
