"""rl-zoo3 trains with SynthER through the hyperparameter file integrations/rlzoo3_synther.py.

``python -m rl_zoo3.train --algo <algo> --env Pendulum-v1 -conf <file>.py`` runs 300 env steps (a
retrain at 200) with the shipped file's settings, only shrunk for a test (tiny preset, UTD 2, small
nets) by a file that ``exec``s the shipped one and updates its ``default`` entry. The saved replay
buffer is our buffer with the retrain in it, and its batches are half synthetic. sac and tqc run by
default; td3, ddpg and crossq in the slow set (``make test-all``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("rl_zoo3")
from rl_zoo3 import ALGOS  # noqa: E402
from stable_baselines3.common.save_util import load_from_pkl  # noqa: E402

from synther_buffer import GenerativeReplayBuffer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "integrations" / "rlzoo3_synther.py"

TEST_HYPERPARAMS = """
from pathlib import Path
_ns = {{}}
exec(Path({shipped!r}).read_text(), _ns)
hyperparams = _ns["hyperparams"]
from synther_buffer import SynthERConfig
hyperparams["default"].update(
    n_timesteps=300, learning_starts=100, batch_size=64, gradient_steps=2, policy_kwargs=dict(net_arch=[64, 64]),
    replay_buffer_kwargs=dict(config=SynthERConfig.preset("tiny").replace(device="cpu", train_steps=200)))
"""


def _train(tmp_path: Path, conf: Path, algo: str = "sac") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "rl_zoo3.train", "--algo", algo, "--env", "Pendulum-v1", "-conf", str(conf),
           "-f", str(tmp_path / "logs"), "--eval-freq", "-1", "--seed", "0", "--device", "cpu",
           "--save-replay-buffer", "--log-interval", "1"]
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)


def test_the_shipped_file_is_the_papers_recipe():
    ns: dict = {}
    exec(SHIPPED.read_text(), ns)
    hp = ns["hyperparams"]["default"]
    assert hp["replay_buffer_class"] is GenerativeReplayBuffer
    assert hp["train_freq"] == 1 and hp["gradient_steps"] == 20
    assert hp["callback"] == "synther_buffer.sb3.SynthERLogCallback"


SLOW_ALGOS = [pytest.param(a, marks=pytest.mark.slow) for a in ("td3", "ddpg", "crossq")]


@pytest.mark.parametrize("algo", ["sac", "tqc", *SLOW_ALGOS])
def test_rl_zoo3_trains_with_the_synther_buffer(tmp_path, algo):
    conf = tmp_path / "synther_test.py"
    conf.write_text(TEST_HYPERPARAMS.format(shipped=str(SHIPPED)))
    p = _train(tmp_path, conf, algo)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    # SynthERLogCallback's metrics in rl-zoo3's own log table
    assert "synther/" in p.stdout and "retrain_count" in p.stdout and "diffusion_loss" in p.stdout, p.stdout[-3000:]
    assert "clipped to" not in p.stderr   # SB3 stores rescaled actions: no action-bounds warning
    run = tmp_path / "logs" / algo / "Pendulum-v1_1"
    buf = load_from_pkl(run / "replay_buffer.pkl")
    assert isinstance(buf, GenerativeReplayBuffer)
    s = buf.stats()
    assert s["env_steps"] == 300 and s["num_real"] == 300 and s["retrain_count"] == 1 and s["num_synthetic"] > 0, s
    batch = buf.sample(64)
    stored = torch.as_tensor(buf.observations[:buf.size(), 0])
    is_real = (batch.observations[:, None, :] == stored[None]).all(-1).any(1)
    assert is_real[:32].all() and not is_real[32:].any()
    model = ALGOS[algo].load(run / "Pendulum-v1.zip", device="cpu")
    assert model.replay_buffer_class is GenerativeReplayBuffer


def test_a_yaml_class_name_does_not_resolve(tmp_path):
    """Why the Python file: rl-zoo3 evals YAML's replay_buffer_class in its own namespace."""
    conf = tmp_path / "synther.yml"
    conf.write_text("default:\n  n_timesteps: 10\n  policy: MlpPolicy\n  replay_buffer_class: GenerativeReplayBuffer\n")
    p = _train(tmp_path, conf)
    assert p.returncode != 0 and "NameError" in p.stderr and "GenerativeReplayBuffer" in p.stderr, p.stderr[-2000:]
