"""GenerativeReplayBuffer.save_synther / load_synther: the SB3 buffer's weights-only files (no pickle runs code)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
import gymnasium as gym  # noqa: E402

from synther_buffer import GenerativeReplayBuffer, SynthERConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def _cfg(**kw) -> SynthERConfig:
    base = dict(device="cpu", train_steps=100, num_generate=300, synthetic_size=300, retrain_every=100, min_real=50)
    base.update(kw)
    return SynthERConfig.preset("tiny").replace(**base)


def _buffer(buffer_size=400, optimize=False, config=None):
    env = gym.make("Pendulum-v1")
    return GenerativeReplayBuffer(buffer_size, env.observation_space, env.action_space, device="cpu",
                                  config=config or _cfg(), optimize_memory_usage=optimize,
                                  handle_timeout_termination=not optimize)


def _feed(buf, n, seed=0):
    r = np.random.default_rng(seed)
    for i in range(n):
        obs = r.uniform(-1, 1, (1, 3)).astype(np.float32)
        act = r.uniform(-1, 1, (1, 1)).astype(np.float32)
        done = np.array([float(i % 37 == 36)], np.float32)
        buf.add(obs, (0.9 * obs).astype(np.float32), act, obs[:, :1].sum(1), done,
                [{"TimeLimit.truncated": bool(i % 74 == 73)}])


@pytest.mark.parametrize("optimize", [False, True])
def test_round_trip_through_weights_only_files(tmp_path, optimize):
    buf = _buffer(optimize=optimize)
    _feed(buf, 450)                                 # wraps the 400-row ring; retrains at 100..400
    assert buf.full and buf.stats()["retrain_count"] == 4
    buf.save_synther(tmp_path / "synther")
    for name in ("state.pt", "real.pt"):            # plain tensors and python: the safe loader takes them
        assert isinstance(torch.load(tmp_path / "synther" / name, weights_only=True), dict)

    back = _buffer(optimize=optimize)
    back.load_synther(tmp_path / "synther")
    for name in ARRAYS[:1] + ARRAYS[2:] if optimize else ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(buf, name), err_msg=name)
    assert (back.pos, back.full) == (buf.pos, buf.full)
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())
    assert back.stats() == buf.stats() and back.config == buf.config
    assert torch.equal(back.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(back.model.sample(64, seed=3), buf.model.sample(64, seed=3))
    assert torch.equal(back.pool.sample(16), buf.pool.sample(16))           # the pool's RNG too
    # the schedule continues identically: both retrain at env step 500 on the same data
    for b in (buf, back):
        _feed(b, 50, seed=9)
    assert back.stats()["retrain_count"] == buf.stats()["retrain_count"] == 5
    assert torch.equal(back.pool.pool, buf.pool.pool)


def test_code_carrying_file_is_refused_and_nothing_runs(tmp_path):
    buf = _buffer()
    _feed(buf, 120)
    buf.save_synther(tmp_path / "synther")
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    state = torch.load(tmp_path / "synther" / "state.pt", weights_only=True)
    state["extra"] = Payload()
    torch.save(state, tmp_path / "synther" / "state.pt")
    other = _buffer()
    before = (other.core, other.observations.copy(), other.pos)
    with pytest.raises(ValueError, match="state.pt"):
        other.load_synther(tmp_path / "synther")
    assert not marker.exists()                      # the pickle's code never ran
    assert other.core is before[0] and other.pos == before[2]
    np.testing.assert_array_equal(other.observations, before[1])
    torch.load(tmp_path / "synther" / "state.pt", weights_only=False)   # the control: a plain unpickler runs it
    assert marker.exists()


def test_foreign_truncated_or_mismatched_files_raise_value_error(tmp_path):
    buf = _buffer()
    _feed(buf, 120)
    buf.save_synther(tmp_path / "s")
    with pytest.raises(ValueError, match="buffer_size 400 .this buffer: 500"):
        _buffer(buffer_size=500).load_synther(tmp_path / "s")
    data = (tmp_path / "s" / "real.pt").read_bytes()
    (tmp_path / "s" / "real.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="real.pt"):
        _buffer().load_synther(tmp_path / "s")
    buf.save_synther(tmp_path / "s")
    torch.save({"version": 1, "kind": "GenerativeReplay"}, tmp_path / "s" / "state.pt")
    with pytest.raises(ValueError, match="not a GenerativeReplayBuffer SynthER checkpoint"):
        _buffer().load_synther(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        _buffer().load_synther(tmp_path / "nothing_here")


def test_saved_for_cuda_loads_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    buf = _buffer()
    _feed(buf, 120)
    buf.save_synther(tmp_path / "s")
    state = torch.load(tmp_path / "s" / "state.pt", weights_only=True)
    state["config"]["device"] = state["pool"]["model"]["config"]["device"] = "cuda"
    torch.save(state, tmp_path / "s" / "state.pt")
    for device in ("cpu", None):                    # asked for, or because CUDA is missing
        back = _buffer()
        back.load_synther(tmp_path / "s", device=device)
        assert back.config.device == back.pool.config.device == back.model.config.device == "cpu"
        assert torch.equal(back.pool.pool, buf.pool.pool)


def test_loaded_buffer_serves_sac(tmp_path):
    from stable_baselines3 import SAC

    kw = dict(train_freq=1, gradient_steps=1, learning_starts=50, batch_size=32, device="cpu", seed=0, verbose=0,
              buffer_size=400, policy_kwargs=dict(net_arch=[16, 16]), replay_buffer_class=GenerativeReplayBuffer,
              replay_buffer_kwargs=dict(config=_cfg()))
    first = SAC("MlpPolicy", gym.make("Pendulum-v1"), **kw)
    first.learn(150)
    first.replay_buffer.save_synther(tmp_path / "s")
    second = SAC("MlpPolicy", gym.make("Pendulum-v1"), **kw)
    second.replay_buffer.load_synther(tmp_path / "s")
    second.num_timesteps = first.num_timesteps
    second.learn(60, reset_num_timesteps=False)     # trains on the loaded pool, retrains at 200
    assert second.replay_buffer.stats()["retrain_count"] == 2
