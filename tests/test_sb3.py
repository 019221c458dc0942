"""GenerativeReplayBuffer / SynthERLogCallback with stable-baselines3 SAC: UTD=20 learning, retrain
schedule (n_envs units), mixed batches, terminals vs timeouts, VecNormalize, save/load, argument
checks. CPU, tiny nets (net_arch [32, 32]) and the tiny diffusion preset cut down further."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import SAC
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from synther_buffer import GenerativeReplayBuffer, SynthERConfig
from synther_buffer.sb3 import SynthERLogCallback

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REQUIRED_STATS = ("env_steps", "num_real", "num_synthetic", "retrain_count", "last_train_loss",
                  "last_fit_seconds", "last_generate_seconds", "real_ratio")
SAC_KW = dict(policy_kwargs=dict(net_arch=[32, 32]), batch_size=32, device="cpu", seed=0, verbose=0)
PENDULUM_OBS, PENDULUM_ACT = 3, 1


def cfg_small(**changes) -> SynthERConfig:
    base = dict(device="cpu", train_steps=200, num_generate=500, synthetic_size=500, retrain_every=100,
                min_real=50)
    base.update(changes)
    return SynthERConfig.preset("tiny").replace(**base)


NO_RETRAIN = cfg_small(retrain_every=10**9)


class Capture(KVWriter):
    """An in-memory SB3 logger output: every dump's key/values."""

    def __init__(self):
        self.dumps = []

    def write(self, key_values, key_excluded, step=0):
        self.dumps.append((step, dict(key_values)))

    def close(self):
        pass


def record_retrains(buf, model=None) -> list:
    """Wrap ``buf.retrain`` (called from add() when due): list of (pool env_steps, model.num_timesteps)."""
    calls, orig = [], buf.retrain

    def retrain():
        calls.append((buf.pool.env_steps, None if model is None else model.num_timesteps))
        return orig()

    buf.retrain = retrain
    return calls


def real_keys(buf) -> set:
    """Bytes of concat(obs, action, reward, next_obs) of every stored real transition."""
    return {r.tobytes() for r in np.ascontiguousarray(buf.real_rows()[:, :-1])}


def batch_keys(b) -> list:
    rows = torch.cat([b.observations, b.actions, b.rewards, b.next_observations], 1).numpy()
    return [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in rows]


def assert_sb3_batch(b, n: int, obs_dim: int, act_dim: int, device) -> None:
    assert b.observations.shape == (n, obs_dim) and b.next_observations.shape == (n, obs_dim)
    assert b.actions.shape == (n, act_dim)
    assert b.rewards.shape == (n, 1) and b.dones.shape == (n, 1)
    assert b.discounts is None
    for t in b[:5]:
        assert t.dtype == torch.float32 and t.device == torch.device(device) and torch.isfinite(t).all()
    assert set(torch.unique(b.dones).tolist()) <= {0.0, 1.0}


def feed(buf, n: int, seed: int = 0, done_p: float = 0.0, truncated: bool = False) -> None:
    """Add n vector steps of random transitions straight into an SB3 buffer."""
    r = np.random.default_rng(seed)
    k, od, ad = buf.n_envs, buf.obs_size, buf.action_dim
    for _ in range(n):
        obs = r.standard_normal((k, od)).astype(np.float32)
        act = r.uniform(-1, 1, (k, ad)).astype(np.float32)
        done = (r.random(k) < done_p)
        infos = [{"TimeLimit.truncated": bool(truncated and d)} for d in done]
        buf.add(obs, (0.9 * obs).astype(np.float32), act, (obs[:, 0] - act[:, 0]).astype(np.float32),
                done.astype(np.float32), infos)


def make_buffer(config=NO_RETRAIN, n_envs=1, model_terminals="auto", buffer_size=1000):
    env = gym.make("Pendulum-v1")
    return GenerativeReplayBuffer(buffer_size, env.observation_space, env.action_space, device="cpu",
                                  n_envs=n_envs, config=config, model_terminals=model_terminals)


def inject_pool(buf, n: int = 40) -> torch.Tensor:
    d = buf.pool.layout.dim
    rows = 1000.0 + torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    if buf.pool.layout.terminal:
        rows[:, -1] = (torch.arange(n) % 2).float()
    buf.pool.pool = rows
    return rows


# ============================================================================ SAC, UTD = 20
@pytest.fixture(scope="module")
def utd20_run():
    """SAC on Pendulum-v1, train_freq=1, gradient_steps=20, 300 env steps, retrain every 100.
    learning_starts=260 keeps it to 800 gradient steps (~10 s); every sampled batch is recorded."""
    cfg = cfg_small()
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), train_freq=1, gradient_steps=20, learning_starts=260,
                replay_buffer_class=GenerativeReplayBuffer, replay_buffer_kwargs=dict(config=cfg), **SAC_KW)
    buf = model.replay_buffer
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    retrains = record_retrains(buf, model)
    batches, orig_sample = [], buf.sample

    def sample(batch_size, env=None):
        out = orig_sample(batch_size, env=env)
        batches.append(out)
        return out

    buf.sample = sample
    model.learn(300, callback=SynthERLogCallback(), log_interval=1)
    return SimpleNamespace(model=model, buf=buf, retrains=retrains, batches=batches, capture=capture, cfg=cfg)


def test_utd20_learn_retrains_on_schedule(utd20_run):
    r = utd20_run
    s = r.buf.stats()
    assert isinstance(r.buf, GenerativeReplayBuffer)
    assert [step for step, _ in r.retrains] == [100, 200, 300]
    assert all(a == b for a, b in r.retrains)                       # env_steps == SB3 num_timesteps
    assert s["retrain_count"] == 300 // r.cfg.retrain_every == 3 and s["failed_retrains"] == 0
    assert s["env_steps"] == r.model.num_timesteps == 300 and s["num_real"] == 300
    assert s["num_synthetic"] > 0 and s["next_retrain"] == 400
    assert set(REQUIRED_STATS) <= set(s) and s["real_ratio"] == 0.5
    assert len(r.batches) == r.model._n_updates == (300 - 260) * 20


def test_utd20_batches_hold_half_synthetic_rows(utd20_run):
    r = utd20_run
    real = real_keys(r.buf)
    for b in r.batches:
        assert_sb3_batch(b, 32, PENDULUM_OBS, PENDULUM_ACT, r.buf.device)
        in_real = np.array([k in real for k in batch_keys(b)])
        assert in_real[:16].all() and not in_real[16:].any()     # floor(0.5 * 32 + 0.5) real, first
        assert (b.dones[16:] == 0).all()                          # Pendulum: no terminal modelled


def test_auto_terminals_pendulum_and_timeouts_are_not_terminals(utd20_run):
    buf = utd20_run.buf
    assert buf.model_terminals == "auto"
    assert buf.pool.layout.terminal is False
    assert buf.model.dim == 2 * PENDULUM_OBS + PENDULUM_ACT + 1     # no terminal column modelled
    assert buf.dones[:buf.pos].sum() >= 1 and buf.timeouts[:buf.pos].sum() >= 1   # 200-step time limit
    assert not buf.real_rows()[:, -1].any()


def test_log_callback_records_synther_keys(utd20_run):
    r = utd20_run
    dumped = set().union(*(kv.keys() for _, kv in r.capture.dumps))
    seen = dumped | set(r.model.logger.name_to_value)
    for key in ("diffusion_loss", "fit_seconds", "generate_seconds", "num_synthetic", "num_real",
                "retrain_count", "num_filtered"):
        assert f"synther/{key}" in seen, key
    retrain_dumps = [kv for _, kv in r.capture.dumps if "synther/diffusion_loss" in kv]
    assert retrain_dumps and all(np.isfinite(kv["synther/diffusion_loss"]) for kv in retrain_dumps)
    assert r.model.logger.name_to_value["synther/num_real"] == 300


def test_log_callback_needs_generative_buffer():
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), learning_starts=10, **SAC_KW)
    with pytest.raises(ValueError, match="GenerativeReplayBuffer"):
        model.learn(2, callback=SynthERLogCallback())


# ============================================================================ n_envs = 2
def test_vec_env_counts_n_envs_per_step():
    from synther_buffer.envs import make_vec_env

    venv = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    cfg = cfg_small(retrain_every=101)
    model = SAC("MlpPolicy", venv, train_freq=1, gradient_steps=1, learning_starts=10**6,
                replay_buffer_class=GenerativeReplayBuffer, replay_buffer_kwargs=dict(config=cfg), **SAC_KW)
    buf = model.replay_buffer
    retrains = record_retrains(buf, model)
    model.learn(400)
    assert buf.n_envs == 2 and buf.pos == 200                        # 200 vector steps ...
    s = buf.stats()
    assert s["env_steps"] == model.num_timesteps == 400               # ... are 400 env steps
    assert s["num_real"] == 400 and buf.real_rows().shape == (400, 2 * 3 + 1 + 1 + 1)
    # retrain_every=101 in env steps: due at the first even count >= 101, 202, 303
    assert retrains == [(102, 102), (202, 202), (304, 304)]
    assert s["retrain_count"] == 400 // 101
    b = buf.sample(50)
    assert_sb3_batch(b, 50, 3, 1, "cpu")
    real = real_keys(buf)
    in_real = np.array([k in real for k in batch_keys(b)])
    assert in_real[:25].all() and not in_real[25:].any()
    venv.close()


# ============================================================================ mixed batch rule
@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 300), ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]), n_envs=st.sampled_from([1, 2]))
def test_mixed_batch_ratio_exact(batch, ratio, n_envs):
    buf = make_buffer(NO_RETRAIN.replace(real_ratio=ratio), n_envs=n_envs, model_terminals=True)
    feed(buf, 30, done_p=0.3)
    real = real_keys(buf)
    before = buf.sample(batch)                                        # no pool: all real
    assert_sb3_batch(before, batch, 3, 1, "cpu")
    assert all(k in real for k in batch_keys(before))
    pool = inject_pool(buf)
    b = buf.sample(batch)
    assert_sb3_batch(b, batch, 3, 1, "cpu")
    n_real = int(np.floor(ratio * batch + 0.5))
    syn = (b.observations[:, 0] >= 1000).numpy()
    assert not syn[:n_real].any() and syn[n_real:].all()
    keys = batch_keys(b)
    assert all(k in real for k in keys[:n_real])
    d = buf.pool.layout.dim
    for i in range(n_real, batch):                                   # whole pool rows, fields in place
        k = int(round((b.observations[i, 0].item() - 1000.0) / d))
        row = pool[k]
        assert torch.equal(b.observations[i], row[:3]) and torch.equal(b.actions[i], row[3:4])
        assert b.rewards[i, 0] == row[4] and torch.equal(b.next_observations[i], row[5:8])
        assert b.dones[i, 0] == row[-1]


# ============================================================================ terminals
def test_auto_model_terminals_true_when_env_terminates(fake_diffusion):
    buf = make_buffer(cfg_small(), model_terminals="auto")
    feed(buf, 100, done_p=0.2)                                        # real terminals, not timeouts
    assert buf.stats()["retrain_count"] == 1
    assert buf.pool.layout.terminal is True
    assert buf.real_rows()[:, -1].any()
    b = buf.sample(200)
    assert set(torch.unique(b.dones[100:]).tolist()) == {0.0, 1.0}


def test_truncations_are_not_terminals(fake_diffusion):
    buf = make_buffer(cfg_small(), model_terminals="auto")
    feed(buf, 100, done_p=0.2, truncated=True)                        # every done is a time limit
    assert buf.dones.sum() > 0 and not buf.real_rows()[:, -1].any()
    assert buf.pool.layout.terminal is False
    assert (buf.sample(64).dones == 0).all()


def test_model_terminals_false_forced(fake_diffusion):
    buf = make_buffer(cfg_small(real_ratio=0.0), model_terminals=False)
    feed(buf, 100, done_p=0.5)
    assert buf.pool.layout.terminal is False and buf.stats()["retrain_count"] == 1
    assert (buf.sample(64).dones == 0).all()


# ============================================================================ VecNormalize
def test_vecnormalize_applies_to_synthetic_rows():
    venv = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), gamma=0.99)
    venv.seed(0)
    venv.reset()
    for _ in range(40):
        venv.step(np.array([venv.action_space.sample()]))
    buf = make_buffer(NO_RETRAIN)
    feed(buf, 50)
    rows = (np.random.default_rng(3).standard_normal((40, buf.pool.layout.dim)) * 3).astype(np.float32)
    buf.pool.pool = torch.from_numpy(rows)
    rng_state = copy.deepcopy(buf.pool.rng.bit_generator.state)
    b = buf.sample(64, env=venv)
    assert_sb3_batch(b, 64, 3, 1, "cpu")

    g = np.random.Generator(np.random.PCG64())
    g.bit_generator.state = rng_state
    syn = rows[g.integers(0, 40, size=32)]                           # the rows the pool drew
    exp_obs, exp_next = venv.normalize_obs(syn[:, :3]), venv.normalize_obs(syn[:, 5:8])
    assert not np.allclose(exp_obs, syn[:, :3], atol=1e-2)           # the normalisation is not trivial
    np.testing.assert_allclose(b.observations[32:].numpy(), exp_obs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.next_observations[32:].numpy(), exp_next, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.rewards[32:].numpy(), venv.normalize_reward(syn[:, 4:5]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b.actions[32:].numpy(), syn[:, 3:4])  # actions are never normalised
    # real rows went through the same normalisation
    stored = venv.normalize_obs(buf.observations[:buf.pos, 0])
    for o in b.observations[:32].numpy():
        assert np.isclose(stored, o, rtol=1e-6, atol=1e-6).all(1).any()
    venv.close()


# ============================================================================ argument checks
def test_dict_observation_space_rejected():
    obs = spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "vel": spaces.Box(-1, 1, (2,))})
    act = spaces.Box(-1, 1, (1,), np.float32)
    with pytest.raises(ValueError, match="FlattenObservation"):
        GenerativeReplayBuffer(100, obs, act, device="cpu", config=NO_RETRAIN)
    with pytest.raises(ValueError, match="FlattenObservation"):
        GenerativeReplayBuffer(100, spaces.Box(-1, 1, (2, 2)), act, device="cpu", config=NO_RETRAIN)


class _DictEnv(gym.Env):
    observation_space = spaces.Dict({"a": spaces.Box(-1, 1, (2,), np.float32)})
    action_space = spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, seed=None, options=None):
        return {"a": np.zeros(2, np.float32)}, {}

    def step(self, action):
        return {"a": np.zeros(2, np.float32)}, 0.0, False, False, {}


def test_dict_env_through_sac_rejected():
    with pytest.raises(ValueError, match="FlattenObservation"):
        SAC("MultiInputPolicy", _DictEnv(), replay_buffer_class=GenerativeReplayBuffer,
            replay_buffer_kwargs=dict(config=NO_RETRAIN), **SAC_KW)


@pytest.mark.parametrize("kw", [dict(config={"width": 8}), dict(config="tiny"),
                                dict(config=NO_RETRAIN.to_dict()), dict(model_terminals="yes"),
                                dict(model_terminals=None)])
def test_bad_arguments_rejected(kw):
    env = gym.make("Pendulum-v1")
    with pytest.raises(ValueError):
        GenerativeReplayBuffer(100, env.observation_space, env.action_space, device="cpu", **kw)


def test_discrete_action_space_rejected():
    env = gym.make("Pendulum-v1")
    with pytest.raises(ValueError, match="Box"):
        GenerativeReplayBuffer(100, env.observation_space, spaces.Discrete(3), device="cpu", config=NO_RETRAIN)


def test_stats_keys_fresh_buffer():
    buf = make_buffer(NO_RETRAIN.replace(real_ratio=0.3), n_envs=2)
    s = buf.stats()
    assert set(REQUIRED_STATS) <= set(s)
    assert (s["env_steps"], s["num_real"], s["num_synthetic"], s["retrain_count"]) == (0, 0, 0, 0)
    assert s["real_ratio"] == 0.3
    feed(buf, 7)
    s = buf.stats()
    assert (s["env_steps"], s["num_real"]) == (14, 14)
    assert buf.sample(10).observations.shape == (10, 3)               # before any retrain: all real


# ============================================================================ save / load
def test_save_load_replay_buffer_roundtrip(tmp_path):
    cfg = cfg_small()
    kw = dict(train_freq=1, gradient_steps=1, learning_starts=10**6, replay_buffer_class=GenerativeReplayBuffer,
              replay_buffer_kwargs=dict(config=cfg), **SAC_KW)
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), **kw)
    model.learn(250)                                                  # retrains at 100 and 200
    buf = model.replay_buffer
    assert buf.stats()["retrain_count"] == 2
    path = tmp_path / "rb.pkl"
    model.save_replay_buffer(path)

    other = SAC("MlpPolicy", gym.make("Pendulum-v1"), **kw)
    other.load_replay_buffer(path)
    back = other.replay_buffer
    assert isinstance(back, GenerativeReplayBuffer) and back is not buf
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(buf, name), err_msg=name)
    assert (back.pos, back.full, back.n_envs) == (buf.pos, buf.full, buf.n_envs)
    np.testing.assert_array_equal(back.real_rows(), buf.real_rows())
    sa, sb = buf.stats(), back.stats()
    assert sa == sb
    assert back.config == buf.config and back.pool.layout == buf.pool.layout
    assert torch.equal(back.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(back.model.normalizer.mean, buf.model.normalizer.mean)
    np.testing.assert_array_equal(back.model.normalizer.std, buf.model.normalizer.std)
    np.testing.assert_array_equal(back.model.sample(32, seed=7), buf.model.sample(32, seed=7))
    assert torch.equal(back.pool.sample(16), buf.pool.sample(16))     # pool rng state kept
    assert back.device == other.device and back.pool.device == buf.pool.device

    # the schedule continues: the same 60 transitions retrain both at env step 300, identically
    for b in (buf, back):
        calls = record_retrains(b)
        feed(b, 60, seed=11)
        assert calls == [(300, None)]
    assert buf.stats()["retrain_count"] == back.stats()["retrain_count"] == 3
    assert torch.equal(back.pool.pool, buf.pool.pool)


def test_pickled_buffer_has_no_callbacks_and_keeps_pool(fake_diffusion):
    import pickle

    buf = make_buffer(cfg_small(), model_terminals=True)
    buf.pool.log_fn = lambda k, v: None                               # SynthERLogCallback sets one
    feed(buf, 100, done_p=0.1)
    clone = pickle.loads(pickle.dumps(buf))
    assert clone.pool.log_fn is None
    assert torch.equal(clone.pool.pool, buf.pool.pool) and clone.stats() == buf.stats()


# ============================================================================ action bounds
class _UnitActionEnv(gym.Env):
    """Actions on [0, 1]: SAC stores policy-space actions, policy.scale_action(a), on [-1, 1]."""

    observation_space = spaces.Box(-10, 10, (3,), np.float32)
    action_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.s = 0, self.np_random.standard_normal(3).astype(np.float32)
        return self.s, {}

    def step(self, action):
        self.t += 1
        self.s = np.clip(0.9 * self.s + float(action[0]), -10, 10).astype(np.float32)
        return self.s, -abs(float(action[0]) - 0.5), False, self.t >= 50, {}


def test_synthetic_actions_live_where_sb3_stores_actions(fake_diffusion):
    model = SAC("MlpPolicy", _UnitActionEnv(), train_freq=1, gradient_steps=1, learning_starts=10**6,
                replay_buffer_class=GenerativeReplayBuffer,
                replay_buffer_kwargs=dict(config=cfg_small(), model_terminals=False), **SAC_KW)
    model.learn(100)
    buf = model.replay_buffer
    stored = buf.actions[:buf.pos, 0, 0]
    assert stored.min() < -0.5 and stored.max() <= 1.0                # SB3 stores [-1, 1] actions
    assert buf.stats()["retrain_count"] == 1
    # the (fake) model returns real rows, so the pool's actions should be real actions
    assert set(buf.pool.pool[:, 3].numpy().tolist()) <= set(stored.tolist())


# ============================================================================ SB3 storage variants
@pytest.mark.parametrize("n_added", [6, 25])
def test_real_rows_with_optimize_memory_usage(n_added):
    """obs and next_obs share one array; once full, the slot at pos (next_obs overwritten) is skipped."""
    env = gym.make("Pendulum-v1")
    buf = GenerativeReplayBuffer(10, env.observation_space, env.action_space, device="cpu",
                                 optimize_memory_usage=True, handle_timeout_termination=False,
                                 config=NO_RETRAIN)
    for t in range(n_added):                          # one trajectory: next_obs(t) == obs(t + 1)
        o = np.full((1, 3), t, np.float32)
        buf.add(o, o + 1, np.full((1, 1), 0.5, np.float32), np.array([float(t)], np.float32),
                np.array([0.0], np.float32), [{}])
    rows = buf.real_rows()
    ids = sorted(rows[:, 0].astype(int).tolist())
    assert ids == (list(range(n_added)) if n_added < 10 else list(range(n_added - 9, n_added)))
    np.testing.assert_array_equal(rows[:, 5:8], rows[:, :3] + 1)      # next_obs = obs + 1
    np.testing.assert_array_equal(rows[:, 4], rows[:, 0])             # reward = t
    assert (rows[:, 3] == 0.5).all() and (rows[:, 8] == 0).all()


# ============================================================================ config=None, old pickles
def test_config_none_is_the_preset_for_the_policy_device():
    env = gym.make("Pendulum-v1")
    buf = GenerativeReplayBuffer(100, env.observation_space, env.action_space, device="cpu")
    assert buf.config == SynthERConfig.preset("fast").replace(device="cpu")
    assert buf.pool.device == torch.device("cpu") and buf.model_terminals == "auto"


OLD_COMMIT = "184f440"   # synther_buffer 0.1.0 as it was before MixingCore: the buffer held `pool` and `config`
OLD_CHILD = r'''
import json, pickle, sys
sys.path.insert(0, sys.argv[1])
import gymnasium as gym, numpy as np, torch
torch.set_num_threads(1)
import synther_buffer
assert synther_buffer.__file__.startswith(sys.argv[1]), synther_buffer.__file__
from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.sb3 import GenerativeReplayBuffer

def fit(self, x, **kw):                       # instant: the "model" bootstraps the real rows
    self._rows, self.fitted = np.array(x, np.float32), True
    self.last_fit = {"loss": 0.25, "seconds": 0.001, "steps": 1, "batch_size": 1}
    return dict(self.last_fit)

TransitionDiffusion.fit = fit
TransitionDiffusion.sample = lambda self, n, **kw: self._rows[np.random.default_rng(0).integers(0, len(self._rows), n)]
env = gym.make("Pendulum-v1")
cfg = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=100, min_real=50, num_generate=300,
                                           synthetic_size=300)
buf = GenerativeReplayBuffer(80, env.observation_space, env.action_space, device="cpu", config=cfg)
r = np.random.default_rng(0)
for t in range(130):
    o = r.standard_normal((1, 3)).astype(np.float32)
    buf.add(o, 0.9 * o, r.uniform(-1, 1, (1, 1)).astype(np.float32), o[:, :1], np.array([t % 9 == 0], np.float32),
            [{}])
with open(sys.argv[2], "wb") as f:
    pickle.dump(buf, f)
np.save(sys.argv[3], buf.real_rows())
torch.save(buf.pool.pool, sys.argv[4])
print(json.dumps({k: v for k, v in buf.stats().items() if v == v}))
'''


def test_replay_buffer_pickled_by_version_0_1_0_loads(tmp_path, fake_diffusion):
    """save_replay_buffer files written before MixingCore (pool and config as attributes, the
    pool's layout a TransitionLayout) load into today's class and keep working."""
    import io
    import json
    import pickle
    import shutil
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs the git checkout (the old version is taken from its history)")
    archive = subprocess.run(["git", "-C", str(root), "archive", OLD_COMMIT, "synther_buffer"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} not in this checkout's history")
    old = tmp_path / "old"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old)
    files = [tmp_path / n for n in ("rb.pkl", "real.npy", "pool.pt")]
    child = subprocess.run([sys.executable, "-c", OLD_CHILD, str(old), *map(str, files)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    old_stats = json.loads(child.stdout.strip().splitlines()[-1])

    with open(files[0], "rb") as f:
        buf = pickle.load(f)
    assert type(buf) is GenerativeReplayBuffer and type(buf.pool.layout).__name__ == "RowLayout"
    np.testing.assert_array_equal(buf.real_rows(), np.load(files[1]))
    assert torch.equal(buf.pool.pool, torch.load(files[2]))
    stats = buf.stats()
    assert {k: stats[k] for k in old_stats} == old_stats and stats["retrain_count"] == 1
    assert buf.model_terminals == "auto" and buf.layout.terminal is True    # terminals were stored
    assert buf.pool.min_real == 50 and buf.core.min_real == 50
    assert_sb3_batch(buf.sample(20), 20, 3, 1, "cpu")
    feed(buf, 70, done_p=0.1)                                       # the schedule continues: env step 200
    assert buf.stats()["env_steps"] == 200 and buf.stats()["next_retrain"] == 300


def test_log_callback_prints_each_retrain_and_sb3_shows_the_metrics(capsys):
    from stable_baselines3 import SAC

    from synther_buffer import SynthERConfig
    from synther_buffer.sb3 import GenerativeReplayBuffer, SynthERLogCallback

    cfg = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=100, min_real=100, train_steps=50,
                                               num_generate=200, synthetic_size=200)
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=100, batch_size=32, train_freq=1, gradient_steps=1,
                policy_kwargs=dict(net_arch=[16, 16]), replay_buffer_class=GenerativeReplayBuffer,
                replay_buffer_kwargs=dict(config=cfg), seed=0, device="cpu", verbose=1)
    model.learn(820, callback=SynthERLogCallback(), log_interval=4)   # Pendulum episodes: 200 steps
    out = capsys.readouterr().out
    assert out.count("SynthER retrain ") == model.replay_buffer.stats()["retrain_count"] >= 2
    assert "SynthER retrain 1 (data up to env step 100)" in out
    table = out[out.index("| synther/"):]                                  # SB3's own log table groups by prefix
    assert "num_synthetic" in table and "retrain_count" in table and "diffusion_loss" in table
    model.learn(100, callback=SynthERLogCallback(verbose=0), reset_num_timesteps=False)
    assert "SynthER retrain" not in capsys.readouterr().out
