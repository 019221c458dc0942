"""The built wheel, installed into a fresh virtualenv, works from outside the checkout.

``test_sb3_wheel`` (default run): the wheel with the ``sb3`` extra only (no MuJoCo, dm_control,
h5py or matplotlib) runs SB3 SAC with ``GenerativeReplayBuffer`` on Pendulum-v1 through a retrain,
``synther --help`` lists the working commands, and the calls that need another extra raise an
ImportError (or exit 1) naming it. ``test_envs_offline_wheel`` (slow): the wheel with
``[envs,offline]`` makes DMC and MuJoCo envs and scores ``synther report --env-id HalfCheetah-v5``.

Speed: the wheel is built once per session; the fresh venvs take torch (and its dependencies) from
the interpreter running the tests through a ``.pth`` file of links instead of installing it again
(hundreds of MB); everything else comes from the index through pip's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILES = ("setup.cfg", "pyproject.toml", "README.md")
NOT_LINKED = {"pip", "setuptools", "wheel"}   # the venv has its own


def _pip(python: Path, *args: str, cwd: Path) -> None:
    p = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=str(cwd),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"pip {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the package and its build files (nothing else of the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT / "synther_buffer", src / "synther_buffer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    _pip(Path(sys.executable), "wheel", "--no-deps", "-w", str(work / "dist"), str(src), cwd=work)
    (whl,) = (work / "dist").glob("synther_buffer-*.whl")
    return whl


def _link_torch(dest: Path) -> None:
    """Symlink torch and the distributions it requires (recursively) from this interpreter into ``dest``."""
    dest.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen or key in NOT_LINKED:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:   # a marker excludes it here; pip installs it if needed
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
        root = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            if (root / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(root / top)


def _fresh_venv(path: Path, *requirements: str) -> Path:
    """A new venv at ``path`` with torch linked in and ``requirements`` pip-installed; returns its bin dir."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    py = path / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _link_torch(path / "shared")
    Path(site, "shared_torch.pth").write_text(str(path / "shared") + "\n")
    _pip(py, "install", *requirements, cwd=path)
    return path / "bin"


def _run(cmd, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MUJOCO_GL="disable")
    return subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


SB3_SCRIPT = """
import importlib.util, json, sys
from pathlib import Path
import numpy as np
import synther_buffer
where = Path(synther_buffer.__file__).resolve()
assert "site-packages" in where.parts and not str(where).startswith({root!r}), where
absent = [m for m in ("mujoco", "dm_control", "shimmy", "h5py", "matplotlib") if importlib.util.find_spec(m)]
assert not absent, f"the sb3 extra pulled {{absent}}"

import gymnasium as gym
import torch
from stable_baselines3 import SAC
from synther_buffer import GenerativeReplayBuffer, SynthERConfig
torch.set_num_threads(1)
cfg = SynthERConfig.preset("tiny").replace(device="cpu", train_steps=200, num_generate=500, synthetic_size=500,
                                           retrain_every=100, min_real=50)
model = SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_starts=50, batch_size=32, train_freq=1, gradient_steps=2,
            replay_buffer_class=GenerativeReplayBuffer, replay_buffer_kwargs=dict(config=cfg),
            policy_kwargs=dict(net_arch=[32, 32]), device="cpu", seed=0, verbose=0)
model.learn(150)
buf = model.replay_buffer
buf.wait()
stats = buf.stats()
assert stats["retrain_count"] >= 1 and stats["num_synthetic"] > 0, stats
assert torch.isfinite(buf.sample(32).observations).all()

from synther_buffer import envs
for env_id in ("cheetah-run", "HalfCheetah-v5"):
    try:
        envs.make_env(env_id)
    except ImportError as e:
        assert 'pip install "synther-buffer[envs]"' in str(e), e
    else:
        raise AssertionError(f"make_env({{env_id!r}}) worked without the envs extra")

r = np.random.default_rng(0)
np.savez("real.npz", observations=r.normal(size=(64, 3)), actions=r.uniform(-1, 1, (64, 1)), rewards=r.normal(size=64),
         next_observations=r.normal(size=(64, 3)), terminals=np.zeros(64))
Path("x.hdf5").write_bytes(b"")
print("SB3-OK " + json.dumps({{k: stats[k] for k in ("env_steps", "retrain_count", "num_synthetic")}}))
"""


def test_sb3_wheel(wheel, tmp_path):
    bin_dir = _fresh_venv(tmp_path / "venv", f"{wheel}[sb3]")
    work = tmp_path / "outside"
    work.mkdir()
    p = _run([bin_dir / "python", "-c", SB3_SCRIPT.format(root=str(ROOT))], cwd=work)
    assert p.returncode == 0 and "SB3-OK" in p.stdout, p.stdout + p.stderr

    p = _run([bin_dir / "synther", "--help"], cwd=work)
    assert p.returncode == 0 and "{upsample,report,train}" in p.stdout and "bench" not in p.stdout, p.stdout

    p = _run([bin_dir / "synther", "upsample", "x.hdf5", "--out", "o.npz", "--preset", "tiny"], cwd=work)
    assert p.returncode == 1 and 'pip install "synther-buffer[offline]"' in p.stderr and "'h5py'" in p.stderr, p.stderr
    p = _run([bin_dir / "synther", "report", "real.npz", "real.npz"], cwd=work)
    assert p.returncode == 1 and 'pip install "synther-buffer[offline]"' in p.stderr and "'matplotlib'" in p.stderr, \
        p.stderr
    assert not (work / "o.npz").exists() and not (work / "real.report.json").exists()


ENVS_SCRIPT = """
import numpy as np
from synther_buffer.envs import make_env
env = make_env("cheetah-run", seed=0)          # dm_control + MuJoCo from the envs extra's ranges
obs, _ = env.reset()
assert obs.shape == (17,) and obs.dtype == np.float32
env.close()

env = make_env("HalfCheetah-v5", seed=0)
rows = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
obs, _ = env.reset()
for _ in range(200):
    a = env.action_space.sample()
    nxt, r, term, trunc, _ = env.step(a)
    for k, v in zip(rows, (obs, a, r, nxt, term)):
        rows[k].append(v)
    obs = nxt
env.close()
d = {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}
np.savez("real.npz", **d)
np.savez("syn.npz", **d)
print("ENVS-OK")
"""


@pytest.mark.slow
def test_envs_offline_wheel(wheel, tmp_path):
    bin_dir = _fresh_venv(tmp_path / "venv", f"{wheel}[envs,offline]")
    work = tmp_path / "outside"
    work.mkdir()
    p = _run([bin_dir / "python", "-c", ENVS_SCRIPT], cwd=work)
    assert p.returncode == 0 and "ENVS-OK" in p.stdout, p.stdout + p.stderr

    p = _run([bin_dir / "synther", "report", "real.npz", "syn.npz", "--env-id", "HalfCheetah-v5"], cwd=work)
    assert p.returncode == 0, p.stdout + p.stderr
    fid = json.loads((work / "syn.report.json").read_text())["fidelity"]
    assert fid is not None and fid["n_scored"] == 200 and fid["dynamics_mse"] < 1e-6, p.stdout
    assert (work / "syn.report.png").stat().st_size > 0
