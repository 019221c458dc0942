"""integrations/cleanrl_sac.py (CleanRL's SAC + GenerativeReplayBuffer) on our gymnasium and on CleanRL's pin.

Both tests run the script for 300 env steps on Pendulum-v1 (tiny preset: one retrain at step 200)
through a driver that wraps ``GenerativeReplayBuffer.sample`` and checks every batch: all real rows
before the first retrain; after it, exactly the first half real (its observations are rows of the
buffer's storage) and the second half synthetic (in no stored row). Synthetic actions must reach
past SB3's [-1, 1] (the script passes Pendulum's [-2, 2] as ``action_bounds``) and the
action-bounds warning must not fire.

``test_cleanrl_sac_gymnasium_0291`` builds a venv with CleanRL's ``gymnasium==0.29.1`` and our
package's ``sb3`` extra (built from this checkout; pip picks the newest stable-baselines3 that
accepts that gymnasium), taking torch from this interpreter through a ``.pth`` file as
``tests/test_wheel.py`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


from test_wheel import BUILD_FILES, _fresh_venv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "integrations" / "cleanrl_sac.py"
ARGS = ["--env-id", "Pendulum-v1", "--total-timesteps", "300", "--learning-starts", "100", "--utd", "2",
        "--batch-size", "64", "--hidden", "64", "--synther-preset", "tiny", "--no-cuda", "--log-every", "100"]

DRIVER = r"""
import json, runpy, sys, warnings
import torch
import gymnasium, stable_baselines3
import synther_buffer.sb3 as sb3mod

torch.set_num_threads(1)
script, args = sys.argv[1], sys.argv[2:]
seen = {"before": 0, "after": 0, "syn_action_absmax": 0.0, "real_action_absmax": 0.0}
original = sb3mod.GenerativeReplayBuffer.sample

def checked_sample(self, batch_size, env=None):
    data = original(self, batch_size, env)
    stored = torch.as_tensor(self.observations[:self.size(), 0])          # n_envs = 1
    obs = data.observations.cpu()
    is_real = (obs[:, None, :] == stored[None]).all(-1).any(1)
    if self.stats()["retrain_count"] == 0:
        assert is_real.all(), f"a synthetic row before the first retrain: {is_real}"
        seen["before"] += 1
    else:
        half = batch_size // 2
        assert is_real[:half].all() and not is_real[half:].any(), f"not half real, half synthetic: {is_real}"
        act = data.actions.cpu().abs()
        seen["syn_action_absmax"] = max(seen["syn_action_absmax"], float(act[half:].max()))
        seen["real_action_absmax"] = max(seen["real_action_absmax"], float(act[:half].max()))
        seen["after"] += 1
    return data

sb3mod.GenerativeReplayBuffer.sample = checked_sample
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    log = runpy.run_path(script, run_name="cleanrl_sac")["main"](args)
seen["bounds_warnings"] = [str(w.message) for w in caught if "clipped to" in str(w.message)]
seen["log"] = {k: v for k, v in log.items() if k.startswith("synther/")}
seen["versions"] = {"gymnasium": gymnasium.__version__, "stable_baselines3": stable_baselines3.__version__}
print("CLEANRL-OK " + json.dumps(seen))
"""


def _run_driver(python, cwd: Path, pythonpath=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    p = subprocess.run([str(python), "-c", DRIVER, str(SCRIPT), *ARGS], cwd=str(cwd), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("CLEANRL-OK ")]
    seen = json.loads(line[len("CLEANRL-OK "):])
    seen["stdout"] = p.stdout
    return seen


def _check(seen: dict) -> None:
    # updates start at step index 100; the 200th transition's add retrains before that step's updates:
    # 99 env steps x UTD 2 all-real batches, then 101 x 2 half-synthetic ones
    assert seen["before"] == 198 and seen["after"] == 202, seen
    assert seen["log"]["synther/retrain_count"] == 1 and seen["log"]["synther/num_synthetic"] > 0, seen["log"]
    # env-scale actions: real ones span Pendulum's [-2, 2]; synthetic ones are not clamped to [-1, 1]
    assert 1.0 < seen["real_action_absmax"] <= 2.0, seen
    assert 1.0 < seen["syn_action_absmax"] <= 2.0 + 1e-6, seen
    assert seen["bounds_warnings"] == [], seen["bounds_warnings"]
    assert "synther/retrain_count=1" in seen["stdout"] and "synther/batch_synthetic_share=0.5" in seen["stdout"]


def test_cleanrl_sac_runs_half_synthetic(tmp_path):
    seen = _run_driver(sys.executable, tmp_path, pythonpath=ROOT)
    _check(seen)


def test_cleanrl_sac_warm_start_flag(tmp_path):
    driver = ("import json, runpy, sys, torch; torch.set_num_threads(1); "
              "log = runpy.run_path(sys.argv[1], run_name='cleanrl_sac')['main'](sys.argv[2:]); "
              "print('LOG ' + json.dumps({k: v for k, v in log.items() if k.startswith('synther/')}))")
    args = [*ARGS, "--total-timesteps", "450", "--warm-start"]        # retrains at 200 (full) and 400 (warm)
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", driver, str(SCRIPT), *args], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("LOG ")]
    log = json.loads(line[len("LOG "):])
    assert log["synther/retrain_count"] == 2 and log["synther/warm_retrains"] == 1, log


def test_cleanrl_sac_gymnasium_0291(tmp_path):
    """The script on CleanRL's pinned gymnasium 0.29.1, our package installed from a build of this checkout."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "synther_buffer", src / "synther_buffer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    py = _fresh_venv(tmp_path / "venv", f"{src}[sb3]", "gymnasium==0.29.1") / "python"
    work = tmp_path / "outside"
    work.mkdir()
    seen = _run_driver(py, work)
    assert seen["versions"]["gymnasium"] == "0.29.1", seen["versions"]
    _check(seen)
