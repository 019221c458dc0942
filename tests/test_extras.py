"""Optional dependencies: the core imports and runs without any extra; a missing extra is named where it is needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from synther_buffer.extras import EXTRAS, MissingExtraError, install_hint, require

ROOT = Path(__file__).resolve().parents[1]

# Every optional top-level package the library may import, by the extra that brings it.
OPTIONAL = {"stable_baselines3": "sb3", "gymnasium": "envs", "mujoco": "envs", "dm_control": "envs",
            "shimmy": "envs", "imageio": "envs", "h5py": "offline", "matplotlib": "offline"}


# ------------------------------------------------------------------------------------------- require
def test_require_returns_the_module():
    import json

    assert require("json", "offline") is json


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MissingExtraError) as e:
        require("h5py", "offline", "reading HDF5")
    err = e.value
    assert isinstance(err, ImportError) and err.extra == "offline" and err.module == "h5py" and err.name == "h5py"
    msg = str(err)
    assert msg.startswith("reading HDF5 needs the Python package 'h5py'")
    assert install_hint("offline") == 'pip install "synther-buffer[offline]"' and install_hint("offline") in msg
    assert isinstance(err.__cause__, ImportError)


def test_an_installed_but_broken_package_is_not_called_missing(monkeypatch, tmp_path):
    (tmp_path / "broken_pkg_xyz").mkdir()
    (tmp_path / "broken_pkg_xyz" / "__init__.py").write_text("raise ImportError('cannot load the bindings')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as e:
        require("broken_pkg_xyz", "envs", "DMC")
    msg = str(e.value)
    assert "is installed but failed to import" in msg and "cannot load the bindings" in msg
    assert 'pip install "synther-buffer[envs]"' in msg


def test_require_rejects_an_unknown_extra():
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "bogus")
    assert set(EXTRAS) == {"sb3", "envs", "offline", "distributed", "torchrl"}


def test_a_module_that_names_its_own_extra_is_not_rewrapped(monkeypatch, tmp_path):
    (tmp_path / "needs_sb3_inside.py").write_text(
        "from synther_buffer.extras import require\nrequire('no_such_module_xyz', 'sb3', 'inner')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as e:
        require("needs_sb3_inside", "envs", "outer")
    assert e.value.extra == "sb3" and str(e.value).startswith("inner needs")


# ------------------------------------------------------------------------------------------- each call site
def test_envs_name_the_extra(monkeypatch):
    pytest.importorskip("gymnasium")
    from synther_buffer import envs

    monkeypatch.setitem(sys.modules, "shimmy", None)
    with pytest.raises(MissingExtraError, match=r"synther-buffer\[envs\]") as e:
        envs.make_env("cheetah-run")
    assert e.value.module == "shimmy"
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(MissingExtraError, match=r"synther-buffer\[envs\]") as e:
        envs.make_env("HalfCheetah-v5")
    assert e.value.module == "mujoco" and "'HalfCheetah-v5'" in str(e.value)
    env = envs.make_env("Pendulum-v1", seed=0)   # classic control needs gymnasium only
    env.close()
    monkeypatch.setitem(sys.modules, "stable_baselines3.common.vec_env", None)
    with pytest.raises(MissingExtraError, match=r"synther-buffer\[sb3\]"):
        envs.make_vec_env("Pendulum-v1")


def test_hdf5_names_the_offline_extra(monkeypatch, tmp_path):
    from synther_buffer.datasets import load_transitions

    (tmp_path / "d.hdf5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MissingExtraError, match=r"HDF5.*synther-buffer\[offline\]"):
        load_transitions(tmp_path / "d.hdf5")


def test_learning_curve_is_skipped_without_matplotlib(monkeypatch, tmp_path):
    from synther_buffer.results import Results, format_summary

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = Results(tmp_path, config={"a": 1}, title="t")
    with pytest.warns(RuntimeWarning, match=r"synther-buffer\[offline\].*learning_curve.png skipped"):
        res.add(10, [1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # one warning per Results, not one per evaluation
        res.add(20, [3.0])
    summary = {"final_eval": {"env_step": 20, "mean_return": 3.0, "std_return": 0.0, "episodes": 1},
               "retrain_count": 0, "retrains": [], "timing_seconds": {"total": 1.0},
               "files": {"csv": str(res.csv_path), "json": str(res.json_path), "png": str(res.png_path)}}
    res.write(summary)
    assert not res.png_path.exists() and res.csv_path.read_text().count("\n") == 3
    assert summary["files"]["png"] is None and "synther-buffer[offline]" in summary["files"]["png_note"]
    assert "synther-buffer[offline]" in res.json_path.read_text()
    assert "plot" in format_summary(summary) and "not drawn: " in format_summary(summary)


def test_report_without_the_simulator_keeps_the_rest(monkeypatch):
    from synther_buffer.report import report

    rng = np.random.default_rng(0)
    d = {"observations": rng.normal(size=(50, 17)), "actions": rng.uniform(-1, 1, (50, 6)),
         "rewards": rng.normal(size=50), "next_observations": rng.normal(size=(50, 17)), "terminals": np.zeros(50)}
    monkeypatch.setitem(sys.modules, "mujoco", None)
    r = report(d, d, env_id="HalfCheetah-v5")
    assert r["fidelity"] is None and 'pip install "synther-buffer[envs]"' in r["fidelity_note"]
    assert r["summary"]["max_mean_diff_in_std"] == 0.0


# ------------------------------------------------------------------------------------------- core only
# Run in a fresh interpreter where every optional package is unimportable (as in a core-only install).
_BLOCK = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""


def _run_core_only(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    code = _BLOCK.format(blocked=sorted(OPTIONAL)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_core_works_without_any_extra(tmp_path):
    p = _run_core_only("""
        import numpy as np, torch
        torch.set_num_threads(1)
        import synther_buffer
        from synther_buffer import GenerativeReplay, SynthERConfig, TransitionDiffusion
        from synther_buffer.extras import MissingExtraError
        from synther_buffer.replay import WrappedReplay
        from synther_buffer import datasets, offline, oracle, report, results, train  # import without extras
        mods = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not mods, mods

        cfg = SynthERConfig.preset("tiny").replace(device="cpu", train_steps=20, num_generate=64,
                                                   synthetic_size=64, retrain_every=40, min_real=40)
        buf = GenerativeReplay(3, 2, capacity=100, config=cfg)
        r = np.random.default_rng(0)
        for _ in range(40):
            buf.add(r.normal(size=3), r.uniform(-1, 1, 2), 0.5, r.normal(size=3), False)
        buf.wait()
        batch = buf.sample(8)
        assert batch.obs.shape == (8, 3) and buf.stats()["retrain_count"] == 1, buf.stats()

        for name, extra in [("GenerativeReplayBuffer", "sb3")]:
            try:
                getattr(synther_buffer, name)
            except MissingExtraError as e:
                assert e.extra == extra and f'pip install "synther-buffer[{extra}]"' in str(e), e
            else:
                raise AssertionError(name)
        for mod, extra in [("synther_buffer.sb3", "sb3"), ("synther_buffer.envs", "envs")]:
            try:
                __import__(mod)
            except MissingExtraError as e:
                assert e.extra == extra, (mod, e)
            else:
                raise AssertionError(mod)
        from synther_buffer import cli
        assert cli.main(["train", "--env", "Pendulum-v1"]) == 1
        print("CORE-OK")
        """, tmp_path)
    assert p.returncode == 0 and "CORE-OK" in p.stdout, p.stdout + p.stderr
    # the agent's framework is named first (before the env stack it would also need)
    assert "synther train: error: synther train needs the Python package 'stable_baselines3'" in p.stderr
    assert 'pip install "synther-buffer[sb3]"' in p.stderr
