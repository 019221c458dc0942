"""Fidelity benchmark (benchmarks/fidelity.py): the simulator oracle, the metrics and a CLI smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

import benchmarks.fidelity as F  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ENVS = ("HalfCheetah-v5", "cheetah-run")
# Random actions and random gaits only: the tuned gait costs a few seconds of search per env.
NO_TUNE = (0.5, 0.5, 0.0)


def _keys(d):
    return {k: d[k] for k in F.KEYS}


@pytest.fixture(scope="module", params=ENVS)
def real(request):
    env = request.param
    train = F.collect_transitions(env, 1000, seed=0, policy_probs=NO_TUNE)
    held = F.collect_transitions(env, 300, seed=1, policy_probs=NO_TUNE)
    return env, _keys(train), _keys(held)


def test_held_out_real_scores_zero_shuffled_high_noise_between(real):
    env, train, held = real
    s_real = F.score_transitions(env, held, reference=train)
    assert s_real["n_scored"] == 300 and s_real["n_nonfinite"] == 0
    assert s_real["normalization"] == "reference"
    assert s_real["dynamics_mse"] < 1e-6, s_real  # float32 round trip only
    assert s_real["reward_mse"] < 1e-6, s_real
    assert s_real["terminal_rate"] == 0.0

    rng = np.random.default_rng(0)
    shuffled = dict(held, next_observations=held["next_observations"][rng.permutation(300)])
    s_shuf = F.score_transitions(env, shuffled, reference=train)

    noisy = dict(held)
    noisy["observations"] = held["observations"] + rng.normal(0, 0.1, held["observations"].shape)
    noisy["next_observations"] = held["next_observations"] + rng.normal(0, 0.1, held["observations"].shape)
    s_noise = F.score_transitions(env, noisy, reference=train)

    assert s_shuf["dynamics_mse"] > 0.5
    assert 0.05 < s_noise["dynamics_mse"] < s_shuf["dynamics_mse"]
    assert s_noise["reward_mse"] > 1e-3  # noise on s changes the simulated reward
    assert set(s_noise) >= {"dynamics_mse_position", "dynamics_mse_velocity", "per_dim_dynamics_mse"}
    assert len(s_noise["per_dim_dynamics_mse"]) == held["observations"].shape[1]
    json.dumps(s_noise)  # JSON friendly (offline.report stores it)


def test_score_options_and_errors(real):
    env, train, held = real
    d = dict(held, rewards=held["rewards"].reshape(-1, 1))  # [N, 1] rewards are fine
    s = F.score_transitions(env, d, max_rows=50, seed=3)
    assert s["n_rows"] == 300 and s["n_scored"] == 50 and s["normalization"] == "self"
    bad = {k: v.astype(np.float64) for k, v in held.items()}
    bad["observations"][:5, 0] = np.nan
    bad["actions"][5:10] = 3.0  # out of bounds: clipped before replay
    s = F.score_transitions(env, bad, obs_std=np.ones(17), reward_std=1.0)
    assert s["n_nonfinite"] == 5 and s["n_scored"] == 295 and s["normalization"] == "given"
    assert s["action_clip_fraction"] > 0
    with pytest.raises(ValueError, match="widths"):
        F.score_transitions(env, dict(held, observations=held["observations"][:, :5]))
    with pytest.raises(ValueError, match="missing"):
        F.score_transitions(env, {"observations": held["observations"]})


def test_unsupported_env_is_a_clear_error():
    with pytest.raises(ValueError, match="not available"):
        F.make_oracle("Pendulum-v1")


def test_augmentations_follow_seed_d1():
    from synther_buffer.datasets import to_rows

    rng = np.random.default_rng(0)
    n, o, a = 200, 4, 2
    d = {"observations": rng.normal(size=(n, o)), "actions": rng.uniform(-1, 1, (n, a)),
         "rewards": rng.normal(size=n), "next_observations": rng.normal(size=(n, o)), "terminals": np.zeros(n)}
    rows, layout = to_rows(d)
    sl = layout.slices()
    # draw every row once, in order, by fixing the generator's index draw
    for kind in ("additive", "multiplicative", "dynamics"):
        r1 = np.random.default_rng(5)
        idx = r1.integers(0, n, n)
        out = F.augment(rows, layout, kind, n, np.random.default_rng(5))
        src = rows[idx]
        assert np.array_equal(out[:, sl["actions"]], src[:, sl["actions"]])
        assert np.array_equal(out[:, sl["rewards"]], src[:, sl["rewards"]])
        s, s2 = out[:, sl["observations"]], out[:, sl["next_observations"]]
        s0, s20 = src[:, sl["observations"]], src[:, sl["next_observations"]]
        if kind == "additive":
            assert 0.07 < np.std(s - s0) < 0.13 and 0.07 < np.std(s2 - s20) < 0.13
        elif kind == "multiplicative":
            ratio = s / s0
            assert np.allclose(ratio, ratio[:, :1], rtol=1e-4)  # one eps per transition
            assert np.allclose(s2 / s20, ratio, rtol=1e-4)
            assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5
        else:
            assert np.allclose(s, s0)
            delta = s20 - s0
            big = np.abs(delta) > 0.05
            eps = np.where(big, (s2 - s) / np.where(big, delta, 1.0), np.nan)
            per_row = np.nanmedian(eps, axis=1, keepdims=True)
            assert np.all(np.abs(eps - per_row)[big] < 1e-4)  # one eps per transition
            assert per_row.min() >= 0.5 - 1e-4 and per_row.max() <= 1.5 + 1e-4


def test_metrics_and_numpy_gmm():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 0.5, (500, 3)), rng.normal(3, 0.5, (500, 3))])
    m = F.distribution_metrics(x, x, x)
    assert m["wasserstein"] == 0 and m["corr_error"] < 1e-12 and m["nn_dist"] < 1e-4
    m2 = F.distribution_metrics(x + 1.0, x, x)
    assert abs(m2["wasserstein"] - 1.0 / x.std(0).mean()) < 0.05
    w, mu, chol = F._gmm_numpy(x, 2, rng)
    assert np.allclose(np.sort(mu[:, 0]), [-3, 3], atol=0.2) and np.allclose(w, 0.5, atol=0.05)


def test_sdmetrics_scores_when_installed():
    pytest.importorskip("sdmetrics")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    s = F.sdmetrics_scores(x, x, ["a", "b", "c", "d"])
    assert s["status"] == "ok" and s["ks_complement"] == pytest.approx(1.0) and s["corr_similarity"] == pytest.approx(1.0)


def test_ctgan_budget_kill_is_reported():
    rng = np.random.default_rng(0)
    res = F.ctgan_generate("tvae", rng.normal(size=(100, 3)).astype(np.float32), ["a", "b", "c"], 10,
                           epochs=300, seed=0, threads=1, budget_s=0.2)
    assert res["rows"] is None and res["status"].startswith("skipped:")


def test_report_uses_score_transitions(real):
    from synther_buffer.report import report

    env, train, held = real
    r = report(train, held, env_id=env)
    assert r["fidelity"] is not None, r.get("fidelity_note")
    assert r["fidelity"]["dynamics_mse"] < 1e-6


def test_cli_smoke(tmp_path):
    out = tmp_path / "fid"
    rc = F.main(["--env", "HalfCheetah-v5", "--preset", "tiny", "--train-steps", "300", "--num-real", "500",
                 "--num-synthetic", "300", "--out", str(out), "--skip-ctgan", "--no-sdmetrics", "--sampler-sweep",
                 "--policy-mix", "1,1,0",
                 "--device", "cpu"])
    assert rc == 0
    for name in ("fidelity.json", "fidelity.csv", "fidelity_sweep.csv", "marginals.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "fidelity.json").read_text())
    labels = [r["generator"] for r in res["table"]]
    assert labels[0] == "real (held-out)" and labels[-1].startswith("SynthER")
    assert len(labels) == 6  # real, 3 augmentations, GMM, SynthER (TVAE/CTGAN skipped)
    assert res["table"][0]["dynamics_mse"] < 1e-6
    assert all(np.isfinite(r["dynamics_mse"]) for r in res["table"])
    assert [s["setting"] for s in res["sampler_sweep"]] == [F.sweep_label(*x) for x in F.SWEEP_SETTINGS]
    assert res["sampler_sweep"][3]["setting"] == "40-step stochastic, sigma_max 5, s_tmin 0.01, s_tmax 80"
    assert res["sampler_sweep"][3]["sigma_max"] == 5 and res["sampler_sweep"][6]["setting"] == "32-step stochastic"
    assert (out / "fidelity.csv").read_text().splitlines()[0].startswith("generator,dynamics_mse")
