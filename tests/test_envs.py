"""Tests for synther_buffer.envs: DMC (real dm_control via shimmy) and gymnasium MuJoCo envs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("shimmy")
pytest.importorskip("dm_control")

from synther_buffer.envs import can_terminate, make_env, make_vec_env, resolve_env_id  # noqa: E402

# (id as passed, resolved id, obs dim, action dim, can terminate, max episode steps)
ENV_CASES = [
    ("dm_control/cheetah-run-v0", "dm_control/cheetah-run-v0", 17, 6, False, 1000),
    ("walker-walk", "dm_control/walker-walk-v0", 24, 6, False, 1000),
    ("quadruped-walk", "dm_control/quadruped-walk-v0", 78, 12, False, 1000),
    ("dm_control/reacher-hard-v0", "dm_control/reacher-hard-v0", 6, 2, False, 1000),
    ("finger-turn-hard", "dm_control/finger-turn_hard-v0", 12, 2, False, 1000),
    ("HalfCheetah-v5", "HalfCheetah-v5", 17, 6, False, 1000),
    ("Walker2d-v5", "Walker2d-v5", 17, 6, True, 1000),
    ("Hopper-v5", "Hopper-v5", 11, 3, True, 1000),
    ("Pendulum-v1", "Pendulum-v1", 3, 1, False, 200),
]


def _meta(env, name):
    return env.get_wrapper_attr(name)


@pytest.mark.parametrize(
    "env_id,resolved,obs_dim,act_dim,terminates,max_steps",
    ENV_CASES,
    ids=[c[0] for c in ENV_CASES],
)
def test_make_env_spaces_and_steps(env_id, resolved, obs_dim, act_dim, terminates, max_steps):
    env = make_env(env_id, seed=0)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        assert isinstance(obs_space, gym.spaces.Box)
        assert obs_space.dtype == np.float32 and obs_space.shape == (obs_dim,)
        assert isinstance(act_space, gym.spaces.Box)
        assert act_space.dtype == np.float32 and act_space.shape == (act_dim,)
        np.testing.assert_array_equal(act_space.low, -np.ones(act_dim, np.float32))
        np.testing.assert_array_equal(act_space.high, np.ones(act_dim, np.float32))

        assert _meta(env, "env_id") == resolved
        assert _meta(env, "can_terminate") is terminates
        assert _meta(env, "max_episode_steps") == max_steps
        assert _meta(env, "action_repeat") == 1
        assert env.spec is not None and env.spec.max_episode_steps == max_steps

        obs, info = env.reset()
        assert isinstance(obs, np.ndarray) and obs.dtype == np.float32
        assert obs.ndim == 1 and obs.shape == obs_space.shape
        assert isinstance(info, dict)
        prev = obs
        for _ in range(3):
            obs, reward, terminated, truncated, info = env.step(act_space.sample())
            assert obs.dtype == np.float32 and obs.shape == (obs_dim,)
            assert np.all(np.isfinite(obs))
            assert type(reward) is float and np.isfinite(reward)
            assert isinstance(terminated, bool) and isinstance(truncated, bool)
            assert not truncated
            assert not (terminated and not terminates)
            if terminated:
                break
        assert not np.array_equal(obs, prev), "stepping must change the observation"
    finally:
        env.close()


@pytest.mark.parametrize(
    "env_id,expected",
    [
        ("dm_control/cheetah-run-v0", False),
        ("cheetah-run", False),
        ("dm_control/hopper-hop-v0", False),
        ("humanoid-run", False),
        ("dm_control/lqr-lqr_2_1-v0", True),
        ("HalfCheetah-v5", False),
        ("Swimmer-v5", False),
        ("Reacher-v5", False),
        ("Pusher-v5", False),
        ("Pendulum-v1", False),
        ("Hopper-v5", True),
        ("Walker2d-v5", True),
        ("Ant-v5", True),
        ("Humanoid-v5", True),
        ("InvertedPendulum-v5", True),
        ("InvertedDoublePendulum-v5", True),
    ],
)
def test_can_terminate_rule(env_id, expected):
    assert can_terminate(env_id) is expected


@pytest.mark.parametrize(
    "env_id,resolved",
    [
        ("cheetah-run", "dm_control/cheetah-run-v0"),
        ("finger-turn_hard", "dm_control/finger-turn_hard-v0"),
        ("finger-turn-hard", "dm_control/finger-turn_hard-v0"),
        ("dm_control/finger-turn-hard-v0", "dm_control/finger-turn_hard-v0"),
        ("ball_in_cup-catch", "dm_control/ball_in_cup-catch-v0"),
        ("Hopper-v5", "Hopper-v5"),
    ],
)
def test_resolve_env_id(env_id, resolved):
    assert resolve_env_id(env_id) == resolved


@pytest.mark.parametrize("env_id", ["walker-walk", "HalfCheetah-v5"])
def test_action_repeat_sums_rewards_and_halves_limit(env_id):
    rep, single = make_env(env_id, seed=3, action_repeat=2), make_env(env_id, seed=3)
    try:
        assert _meta(rep, "max_episode_steps") == _meta(single, "max_episode_steps") // 2 == 500
        assert rep.spec.max_episode_steps == 500
        assert _meta(rep, "action_repeat") == 2
        obs_r, _ = rep.reset()
        obs_s, _ = single.reset()
        np.testing.assert_array_equal(obs_r, obs_s)
        rng = np.random.default_rng(0)
        for _ in range(3):
            a = rng.uniform(-1, 1, size=rep.action_space.shape).astype(np.float32)
            obs_r, r_rep, *_ = rep.step(a)
            _, r1, *_ = single.step(a)
            obs_s, r2, *_ = single.step(a)
            assert r1 != 0.0 and r2 != 0.0
            assert r_rep == pytest.approx(r1 + r2, rel=1e-9, abs=1e-12)
            np.testing.assert_array_equal(obs_r, obs_s)
    finally:
        rep.close()
        single.close()


@pytest.mark.parametrize(
    "env_id,action_repeat,max_steps",
    [
        ("cheetah-run", 50, 20),  # DMC: 1000 control steps
        ("dm_control/reacher-hard-v0", 3, 333),  # limit not a multiple of the repeat
        ("Pendulum-v1", 50, 4),  # gymnasium registered limit 200
    ],
)
def test_episode_truncates_at_max_episode_steps(env_id, action_repeat, max_steps):
    env = make_env(env_id, seed=1, action_repeat=action_repeat)
    try:
        assert _meta(env, "max_episode_steps") == max_steps
        assert env.spec.max_episode_steps == max_steps
        env.reset()
        zero = np.zeros(env.action_space.shape, np.float32)
        for t in range(1, max_steps + 1):
            _, _, terminated, truncated, _ = env.step(zero)
            assert not terminated
            assert truncated is (t == max_steps), f"step {t}"
    finally:
        env.close()


def test_action_repeat_stops_at_termination():
    single = make_env("Hopper-v5", seed=0)
    full = np.ones(single.action_space.shape, np.float32)
    try:
        single.reset()
        rewards = []
        for _ in range(200):
            obs_k, r, terminated, truncated, _ = single.step(full)
            rewards.append(r)
            if terminated or truncated:
                break
        assert terminated and not truncated, "Hopper should fall over under a constant action"
    finally:
        single.close()
    k = len(rewards)
    # One agent step of k + 1 repeats must stop after the k-th env step, where Hopper terminated.
    rep = make_env("Hopper-v5", seed=0, action_repeat=k + 1)
    try:
        rep.reset()
        obs, reward, terminated, truncated, _ = rep.step(full)
        assert terminated and not truncated
        np.testing.assert_array_equal(obs, obs_k)
        assert reward == pytest.approx(sum(rewards), rel=1e-9)
    finally:
        rep.close()


def test_seed_reproducible_and_explicit_reset_seed_wins():
    a, b, c = (make_env("cheetah-run", seed=s) for s in (7, 7, 8))
    try:
        oa, _ = a.reset()
        ob, _ = b.reset()
        oc, _ = c.reset()
        np.testing.assert_array_equal(oa, ob)
        assert not np.array_equal(oa, oc)
        np.testing.assert_array_equal(a.action_space.sample(), b.action_space.sample())
        # The stored seed applies to the first reset only; an explicit seed always wins.
        assert not np.array_equal(a.reset()[0], oa)
        np.testing.assert_array_equal(c.reset(seed=7)[0], oa)
    finally:
        for e in (a, b, c):
            e.close()


def test_actions_rescaled_and_clipped_to_dmc_bounds():
    # quadruped's native action bounds are asymmetric ([-1, -1, -0.8] .. [1, 1.1, 0.8] per leg).
    env = make_env("quadruped-walk", seed=0)
    try:
        env.reset()
        physics = env.unwrapped._env.physics
        spec = env.unwrapped._env.action_spec()
        low, high = spec.minimum, spec.maximum
        assert not np.allclose(low, -1) or not np.allclose(high, 1)
        a = np.linspace(-1, 1, env.action_space.shape[0]).astype(np.float32)
        env.step(a)
        np.testing.assert_allclose(physics.data.ctrl, low + (a + 1) / 2 * (high - low), atol=1e-6)
        env.step(np.full(env.action_space.shape, 5.0, np.float32))  # out of bounds -> clipped
        np.testing.assert_allclose(physics.data.ctrl, high, atol=1e-9)
    finally:
        env.close()


@pytest.mark.parametrize(
    "bad_id", ["not-an-env", "Nope-v9", "dm_control/cheetah-fly-v0", "cheetah-fly", ""]
)
def test_unknown_id_raises_value_error(bad_id):
    with pytest.raises(ValueError, match="unknown environment id") as exc:
        make_env(bad_id)
    assert "cheetah-run" in str(exc.value)  # lists examples
    with pytest.raises(ValueError):
        can_terminate(bad_id)


@pytest.mark.parametrize("bad_repeat", [0, -1, 1.5, "2", 1001])
def test_bad_action_repeat_raises_value_error(bad_repeat):
    with pytest.raises(ValueError, match="action_repeat"):
        make_env("cheetah-run", action_repeat=bad_repeat)


def test_non_box_action_space_raises_value_error():
    with pytest.raises(ValueError, match="Box"):
        make_env("CartPole-v1")


@pytest.mark.parametrize("env_id,obs_dim", [("cheetah-run", 17), ("Hopper-v5", 11)])
def test_make_vec_env_dummy(env_id, obs_dim):
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = make_vec_env(env_id, n_envs=2, seed=10, action_repeat=50)
    try:
        assert isinstance(venv, DummyVecEnv) and venv.num_envs == 2
        assert all(isinstance(e, Monitor) for e in venv.envs)
        assert venv.observation_space.dtype == np.float32
        assert venv.observation_space.shape == (obs_dim,)
        obs = venv.reset()
        assert obs.dtype == np.float32 and obs.shape == (2, obs_dim)
        # env i is seeded with seed + i
        assert not np.array_equal(obs[0], obs[1])
        for i in range(2):
            single = make_env(env_id, seed=10 + i, action_repeat=50)
            np.testing.assert_array_equal(obs[i], single.reset()[0])
            single.close()
        assert venv.get_attr("can_terminate") == [can_terminate(env_id)] * 2
        assert venv.get_attr("max_episode_steps") == [1000 // 50] * 2
        infos = []
        for _ in range(20):
            zeros = np.zeros((2, *venv.action_space.shape), np.float32)
            obs, rewards, dones, infos = venv.step(zeros)
            assert obs.dtype == np.float32 and obs.shape == (2, obs_dim)
            assert rewards.shape == (2,)
            if dones.any():
                break
        if env_id == "cheetah-run":  # never terminates: both episodes end by truncation at step 20
            assert dones.all()
            for info in infos:
                assert info["episode"]["l"] == 20 and info["TimeLimit.truncated"]
    finally:
        venv.close()


def test_make_vec_env_subproc_matches_dummy():
    from stable_baselines3.common.vec_env import SubprocVecEnv

    sub = make_vec_env("cheetah-run", n_envs=2, seed=4, subproc=True)
    dummy = make_vec_env("cheetah-run", n_envs=2, seed=4)
    try:
        assert isinstance(sub, SubprocVecEnv) and sub.num_envs == 2
        obs_sub, obs_dummy = sub.reset(), dummy.reset()
        assert obs_sub.dtype == np.float32 and obs_sub.shape == (2, 17)
        np.testing.assert_array_equal(obs_sub, obs_dummy)
        actions = np.random.default_rng(0).uniform(-1, 1, (2, 6)).astype(np.float32)
        obs_sub, r_sub, _, _ = sub.step(actions)
        obs_dummy, r_dummy, _, _ = dummy.step(actions)
        np.testing.assert_array_equal(obs_sub, obs_dummy)
        # DummyVecEnv stores rewards as float32, SubprocVecEnv returns float64.
        np.testing.assert_allclose(r_sub, r_dummy, rtol=1e-6)
        assert sub.get_attr("env_id") == ["dm_control/cheetah-run-v0"] * 2
    finally:
        sub.close()
        dummy.close()


def test_make_vec_env_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_envs"):
        make_vec_env("Pendulum-v1", n_envs=0)
    with pytest.raises(ValueError, match="action_repeat"):
        make_vec_env("Pendulum-v1", action_repeat=0)
    with pytest.raises(ValueError, match="unknown environment id"):
        make_vec_env("no-such-env-v0")


def test_shimmy_and_sb3_imported_lazily():
    code = (
        "import sys\n"
        "from synther_buffer.envs import make_env\n"
        "before = [m in sys.modules for m in ('shimmy', 'stable_baselines3')]\n"
        "make_env('Pendulum-v1').close()\n"
        "after_gym = 'shimmy' in sys.modules\n"
        "make_env('cheetah-run').close()\n"
        "print(before, after_gym, 'shimmy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip().splitlines()[-1]
    assert out == "[False, False] False True"
