"""Simulator oracles for DMC walker and reacher: the physics state a flat observation describes.

The core check is the round trip on real transitions: put the oracle in the state of a real
observation, apply the real action, and the simulator's next observation and reward must be the
real ones (up to float32 rounding of the stored observation).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dm_control")
pytest.importorskip("shimmy")

from synther_buffer import oracle as O  # noqa: E402
from synther_buffer.envs import make_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

import benchmarks.fidelity as F  # noqa: E402

ENVS = ("walker-walk", "reacher-hard")
STEPS = 400


def _rollout(env_id: str, steps: int, seed: int = 0):
    """Real transitions from ``make_env`` plus the physics qpos and the reacher target per row.

    Walker: uniform random actions (episodes of 100 steps, so x drifts and bodies tumble).
    Reacher: half the episodes run the reaching controller, so some rows earn reward.
    """
    env = make_env(env_id, seed=seed)
    physics = env.unwrapped._env.physics
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "qpos", "target")}
    obs, _ = env.reset(seed=seed)
    ep_len, t, reach = 100, 0, False
    try:
        while len(rows["rewards"]) < steps:
            if reach:
                a = F.reach_action(obs, 150.0, 0.1) + rng.normal(0, 0.1, 2)
            else:
                a = rng.uniform(-1, 1, env.action_space.shape)
            a = np.clip(a, -1, 1).astype(np.float32)
            rows["qpos"].append(physics.data.qpos.copy())
            rows["target"].append(physics.named.model.geom_pos["target", :2].copy()
                                  if env_id.startswith("reacher") else np.zeros(2))
            nxt, r, term, trunc, _ = env.step(a)
            for k, v in zip(("observations", "actions", "rewards", "next_observations"), (obs, a, r, nxt)):
                rows[k].append(v)
            obs, t = nxt, t + 1
            if term or trunc or t % ep_len == 0:
                obs, _ = env.reset(seed=int(rng.integers(2 ** 31)))
                reach = env_id.startswith("reacher") and not reach
    finally:
        env.close()
    return {k: np.asarray(v) for k, v in rows.items()}


@pytest.fixture(scope="module", params=ENVS)
def real(request):
    env_id = request.param
    with O.make_oracle(env_id) as orc:
        yield env_id, _rollout(env_id, STEPS), orc


def test_round_trip_on_real_transitions(real):
    env_id, d, orc = real
    assert d["observations"].dtype == np.float32  # the stored (flat, float32) observation is the input
    sim = [orc.step(o, a) for o, a in zip(d["observations"], d["actions"])]
    sim_next = np.array([s[0] for s in sim])
    sim_rew = np.array([s[1] for s in sim])
    err = np.abs(sim_next - d["next_observations"])
    scale = 1.0 + np.abs(d["next_observations"])
    assert np.max(err / scale) < 1e-5, (env_id, err.max(axis=0))
    assert np.max(np.abs(sim_rew - d["rewards"])) < 1e-6
    std = F.safe_std(d["next_observations"])
    assert np.mean((err / std) ** 2) < 1e-10


def test_round_trip_covers_x_and_reward(real):
    """The round trip above is only meaningful if the data leave x = 0 (walker) and hit the target (reacher)."""
    env_id, d, _ = real
    if env_id.startswith("walker"):
        assert np.max(np.abs(d["qpos"][:, 1])) > 0.3  # rootx: the oracle replays it as 0
        pitch = np.arctan2(d["observations"][:, 2], d["observations"][:, 1])  # torso (xz, xx)
        assert np.max(np.abs(pitch)) > 2.0  # the torso tumbles well past upright
    else:
        assert (d["rewards"] == 1.0).sum() >= 10 and (d["rewards"] == 0.0).sum() >= 10


def test_state_reconstruction_matches_physics(real):
    """The qpos (and reacher's target) the oracle writes are the real ones, except walker's rootx."""
    env_id, d, orc = real
    p = orc._physics
    for obs, qpos, target in zip(d["observations"][::7], d["qpos"][::7], d["target"][::7]):
        with p.reset_context():
            orc._set_state(np.asarray(obs, dtype=np.float64))
        got = p.data.qpos.copy()
        if env_id.startswith("walker"):
            assert got[1] == 0.0
            diff = got - qpos
            diff[2] = (diff[2] + math.pi) % (2 * math.pi) - math.pi  # rooty: only its value mod 2 pi matters
            assert np.max(np.abs(np.delete(diff, 1))) < 1e-5, (qpos, got)
        else:
            assert np.max(np.abs(got - qpos)) < 1e-6
            assert np.max(np.abs(p.model.geom_pos[orc._target, :2] - target)) < 1e-6


def test_perturbed_action_or_state_changes_the_next_obs(real):
    """The oracle really steps the physics: a different action or state gives a different next state."""
    env_id, d, orc = real
    moved_a, moved_s = [], []
    for i in range(0, 100, 10):
        obs, act, nxt = d["observations"][i], d["actions"][i], d["next_observations"][i]
        base, _ = orc.step(obs, act)
        assert np.max(np.abs(base - nxt)) < 1e-4
        other = np.where(act > 0, act - 0.8, act + 0.8)
        moved_a.append(np.max(np.abs(orc.step(obs, other)[0] - nxt)))
        vel = orc.dim_groups["velocity"]
        obs2 = obs.astype(np.float64).copy()
        obs2[vel] += 0.5
        moved_s.append(np.max(np.abs(orc.step(obs2, act)[0] - nxt)))
    assert min(moved_a) > 1e-3, moved_a
    assert min(moved_s) > 1e-3, moved_s


def test_score_transitions_held_out_real_is_zero_and_noise_is_not(real):
    env_id, d, _ = real
    rows = {k: d[k] for k in O.KEYS[:4]}
    s = O.score_transitions(env_id, rows, reference=rows)
    assert s["n_scored"] == STEPS and s["n_nonfinite"] == 0
    assert s["dynamics_mse"] < 1e-9 and s["reward_mse"] < 1e-9
    assert set(s) >= {f"dynamics_mse_{k}" for k in ("velocity",)}
    rng = np.random.default_rng(1)
    noisy = dict(rows, observations=rows["observations"] + rng.normal(0, 0.1, rows["observations"].shape))
    assert O.score_transitions(env_id, noisy, reference=rows)["dynamics_mse"] > 1e-3


@pytest.mark.parametrize("env_id, cls, obs_dim, act_dim, keys", [
    ("walker-walk", O.DMCWalkerOracle, 24, 6, ("height", "orientations", "velocity")),
    ("dm_control/walker-walk-v0", O.DMCWalkerOracle, 24, 6, ("height", "orientations", "velocity")),
    ("walker-run", O.DMCWalkerOracle, 24, 6, ("height", "orientations", "velocity")),
    ("reacher-hard", O.DMCReacherOracle, 6, 2, ("position", "to_target", "velocity")),
    ("dm_control/reacher-hard-v0", O.DMCReacherOracle, 6, 2, ("position", "to_target", "velocity")),
    ("cheetah-run", O.DMCCheetahOracle, 17, 6, ("position", "velocity")),
])
def test_make_oracle_routes_every_spelling(env_id, cls, obs_dim, act_dim, keys):
    with O.make_oracle(env_id) as orc:
        assert type(orc) is cls
        assert orc.env_id.startswith("dm_control/") and orc.env_id.endswith("-v0")
        assert (orc.obs_dim, orc.action_dim) == (obs_dim, act_dim)
        assert orc.obs_keys == keys
        env = make_env(env_id)
        try:
            assert env.observation_space.shape == (obs_dim,)
        finally:
            env.close()


def test_routing_keeps_each_task_reward():
    """walker-run and reacher-easy are replayed with their own task (reward), not walk's / hard's."""
    with O.make_oracle("walker-run") as run, O.make_oracle("walker-walk") as walk:
        assert run._task._move_speed == 8 and walk._task._move_speed == 1
    with O.make_oracle("reacher-easy") as easy, O.make_oracle("reacher-hard") as hard:
        assert easy._physics.named.model.geom_size["target", 0] == pytest.approx(0.05)
        assert hard._physics.named.model.geom_size["target", 0] == pytest.approx(0.015)


def test_unsupported_and_mismatched_ids():
    with pytest.raises(ValueError, match="not available"):
        O.make_oracle("hopper-hop")
    with pytest.raises(ValueError, match="walker"):
        O.DMCWalkerOracle("cheetah-run")
    assert any("walker-walk" in s for s in O.SUPPORTED_ENVS) and any("reacher-hard" in s for s in O.SUPPORTED_ENVS)


def test_reach_action_reaches():
    """The reacher collector's scripted policy earns reward (so the fidelity data holds rewarding rows)."""
    env = make_env("reacher-hard", seed=0)
    try:
        total = 0.0
        for ep in range(2):
            obs, _ = env.reset(seed=ep)
            for _ in range(150):
                obs, r, *_ = env.step(np.clip(F.reach_action(obs, 150.0, 0.1), -1, 1).astype(np.float32))
                total += r
    finally:
        env.close()
    assert total / 300 > 0.3


@pytest.mark.parametrize("env_id", ENVS)
def test_fidelity_cli_runs_on_the_dmc_tasks(env_id, tmp_path):
    """``python -m benchmarks.fidelity --env walker-walk / reacher-hard`` runs; held-out real scores ~0."""
    import json

    out = tmp_path / "fid"
    rc = F.main(["--env", env_id, "--num-real", "300", "--num-synthetic", "200", "--generators", "real,additive",
                 "--no-sdmetrics", "--policy-mix", "1,1,0" if env_id.startswith("walker") else "0,1,1",
                 "--episode-seconds", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "fidelity.json").read_text())
    real_row, noise_row = res["table"]
    assert real_row["dynamics_mse"] < 1e-9 and real_row["reward_mse"] < 1e-9
    assert noise_row["dynamics_mse"] > 1e-3
    if env_id.startswith("reacher"):
        assert res["train_policy_mix"]["tuned"] > 0
