"""synther_buffer.offline: loaders, row layout, streaming upsample, mixtures, compression, report."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer import datasets, offline, report as report_mod
from synther_buffer.datasets import RowLayout, from_rows, load_array, load_source, load_transitions, to_rows
from synther_buffer.offline import compression_report, upsample
from synther_buffer.report import report

OBS, ACT = 3, 2




def make_transitions(n: int = 300, seed: int = 0, terminal_every: int = 0, timeouts: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, OBS)).astype(np.float32)
    d = {"observations": obs,
         "actions": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
         "rewards": rng.standard_normal(n).astype(np.float32),
         "next_observations": (obs + 0.1 * rng.standard_normal((n, OBS))).astype(np.float32),
         "terminals": np.zeros(n, dtype=np.float32)}
    if terminal_every:
        d["terminals"][::terminal_every] = 1.0
    if timeouts:
        d["timeouts"] = (np.arange(n) % 50 == 49).astype(np.float32)
    return d


def tiny_config(**kw) -> SynthERConfig:
    return SynthERConfig.preset("tiny").replace(train_steps=300, sample_steps=8, **kw)


@pytest.fixture(scope="module")
def data() -> dict:
    return make_transitions(terminal_every=10)


@pytest.fixture(scope="module")
def fitted(data):
    """One tiny model fitted on ``data`` (terminals modelled) and reused by the streaming tests."""
    rows, layout = to_rows(data)
    model = offline.make_model(layout, rows.shape[1], tiny_config())
    model.fit(rows)
    return model, rows, layout


def row_set(rows: np.ndarray) -> set:
    return {r.tobytes() for r in np.ascontiguousarray(rows, dtype=np.float32)}


def assert_same(a: dict, b: dict, keys=None) -> None:
    for k in keys or datasets.REQUIRED_KEYS:
        np.testing.assert_array_equal(np.asarray(a[k]).reshape(len(a[k]), -1).astype(np.float32),
                                      np.asarray(b[k]).reshape(len(b[k]), -1).astype(np.float32), err_msg=k)


# ------------------------------------------------------------------------------------------- loaders
def test_npz_round_trip(tmp_path, data):
    p = tmp_path / "d.npz"
    np.savez(p, extra=np.arange(3), **data)
    got = load_transitions(p)
    assert set(got) == set(datasets.REQUIRED_KEYS) | {"timeouts"}
    assert_same(got, data, list(datasets.REQUIRED_KEYS) + ["timeouts"])
    assert got["observations"].dtype == np.float32 and got["rewards"].shape == (300,)


def test_d4rl_hdf5_round_trip(tmp_path, data):
    p = tmp_path / "d4rl.hdf5"
    with h5py.File(p, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v if k not in ("terminals", "timeouts") else v.astype(bool))
        f.create_dataset("infos/qpos", data=np.zeros((300, 4)))
        f.create_group("metadata").attrs["algorithm"] = "SAC"
    got = load_transitions(p)
    assert_same(got, data, list(datasets.REQUIRED_KEYS) + ["timeouts"])
    assert got["terminals"].dtype == np.bool_
    rows, layout = to_rows(got)
    assert layout.terminal and layout.terminal_dtype == "bool"


def test_d4rl_hdf5_without_next_observations_uses_qlearning_rule(tmp_path, data):
    p = tmp_path / "raw.h5"
    with h5py.File(p, "w") as f:
        for k, v in data.items():
            if k != "next_observations":
                f.create_dataset(k, data=v)
    got = load_transitions(p)
    keep = np.nonzero(data["timeouts"][:-1] == 0)[0]
    assert len(got["observations"]) == len(keep)
    np.testing.assert_array_equal(got["next_observations"], data["observations"][keep + 1])
    np.testing.assert_array_equal(got["actions"], data["actions"][keep])


def _write_minari(root: Path, lengths, dict_obs: bool = False) -> list:
    (root / "data").mkdir(parents=True)
    eps = []
    rng = np.random.default_rng(1)
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        f.attrs["total_episodes"] = len(lengths)
        for i, t in enumerate(lengths):
            g = f.create_group(f"episode_{i * 5}")  # ids 0, 5, 10: numeric (not lexicographic) order
            obs = rng.standard_normal((t + 1, OBS)).astype(np.float32)
            if dict_obs:
                o = g.create_group("observations")
                o.create_dataset("b_vel", data=obs[:, 2:])
                o.create_dataset("a_pos", data=obs[:, :2])
            else:
                g.create_dataset("observations", data=obs)
            act = rng.standard_normal((t, ACT)).astype(np.float32)
            rew = rng.standard_normal(t).astype(np.float32)
            term = np.zeros(t, bool); term[-1] = i == 0
            trunc = np.zeros(t, bool); trunc[-1] = i != 0
            for k, v in (("actions", act), ("rewards", rew), ("terminations", term), ("truncations", trunc)):
                g.create_dataset(k, data=v)
            g.create_group("infos")
            eps.append((obs, act, rew, term, trunc))
    (root / "data" / "metadata.json").write_text("{}")
    return eps


@pytest.mark.parametrize("dict_obs", [False, True])
def test_minari_directory(tmp_path, dict_obs):
    eps = _write_minari(tmp_path / "mujoco" / "hopper" / "medium-v0", [4, 6, 3], dict_obs)
    got = load_transitions(tmp_path / "mujoco" / "hopper" / "medium-v0")
    assert len(got["observations"]) == 13
    exp_obs = np.concatenate([e[0][:-1] for e in eps])
    exp_next = np.concatenate([e[0][1:] for e in eps])
    np.testing.assert_array_equal(got["observations"], exp_obs)       # Dict obs: sorted keys a_pos | b_vel
    np.testing.assert_array_equal(got["next_observations"], exp_next)
    np.testing.assert_array_equal(got["actions"], np.concatenate([e[1] for e in eps]))
    np.testing.assert_array_equal(got["terminals"], np.concatenate([e[3] for e in eps]).astype(np.float32))
    np.testing.assert_array_equal(got["timeouts"], np.concatenate([e[4] for e in eps]).astype(np.float32))
    # the hdf5 file itself loads too
    again = load_transitions(tmp_path / "mujoco" / "hopper" / "medium-v0" / "data" / "main_data.hdf5")
    assert_same(again, got)


def test_minari_bad_episode_lengths(tmp_path):
    root = tmp_path / "m"
    (root / "data").mkdir(parents=True)
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        g = f.create_group("episode_0")
        g.create_dataset("observations", data=np.zeros((5, 2)))  # should be T + 1 = 4
        g.create_dataset("actions", data=np.zeros((3, 1)))
        for k in ("rewards", "terminations", "truncations"):
            g.create_dataset(k, data=np.zeros(3))
    with pytest.raises(ValueError, match="episode_0.*mismatched lengths"):
        load_transitions(root)


def test_plain_npy_array(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "lat.npy", x)
    np.testing.assert_array_equal(load_array(tmp_path / "lat.npy"), x)
    assert isinstance(load_source(tmp_path / "lat.npy"), np.ndarray)
    with pytest.raises(ValueError, match="plain array"):
        load_transitions(tmp_path / "lat.npy")
    np.save(tmp_path / "flat.npy", np.zeros(10))
    with pytest.raises(ValueError, match="2-D"):
        load_array(tmp_path / "flat.npy")


# ------------------------------------------------------------------------------------------- bad inputs
def test_missing_key(tmp_path, data):
    d = dict(data); del d["next_observations"]
    np.savez(tmp_path / "m.npz", **d)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['next_observations'\]"):
        load_transitions(tmp_path / "m.npz")


def test_mismatched_lengths(tmp_path, data):
    d = dict(data); d["rewards"] = d["rewards"][:-1]
    np.savez(tmp_path / "m.npz", **d)
    with pytest.raises(ValueError, match="mismatched lengths"):
        load_transitions(tmp_path / "m.npz")
    d = dict(data); d["next_observations"] = d["next_observations"][:, :2]
    with pytest.raises(ValueError, match="next_observations have width 2"):
        to_rows(d)


def test_unknown_types_and_missing_paths(tmp_path, data):
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown dataset type"):
        load_transitions(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError):
        load_transitions(tmp_path / "nope.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Minari dataset"):
        load_transitions(tmp_path / "empty")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not read"):
        load_transitions(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unknown output type"):
        upsample(data, tmp_path / "out.csv", num_samples=10, config=tiny_config())
    with pytest.raises(ValueError, match="mix"):
        upsample(data, tmp_path / "out.npz", num_samples=10, mix=1.0, config=tiny_config())
    with pytest.raises(ValueError, match="num_samples"):
        upsample(data, tmp_path / "out.npz", num_samples=0, config=tiny_config())
    with pytest.raises(ValueError, match="plain array input writes a .npy"):
        upsample(np.zeros((10, 3), np.float32), tmp_path / "out.npz", num_samples=10, config=tiny_config())
    d = dict(data); d["rewards"] = d["rewards"].copy(); d["rewards"][3] = np.nan
    with pytest.raises(ValueError, match=r"'rewards' has non-finite values \(first at transition 3\)"):
        upsample(d, tmp_path / "out.npz", num_samples=10, config=tiny_config())
    assert not list(tmp_path.glob("out*"))


# ------------------------------------------------------------------------------------------- rows
def test_rows_round_trip_and_terminal_rule(data):
    rows, layout = to_rows(data)
    assert layout == RowLayout(OBS, ACT, terminal=True, timeouts=True, terminal_dtype="float32")
    assert rows.shape == (300, 2 * OBS + ACT + 2) and rows.dtype == np.float32
    assert layout.column_names()[layout.reward_col] == "reward" and layout.terminal_col == rows.shape[1] - 1
    back = from_rows(rows, layout, timeouts=data["timeouts"])
    assert_same(back, data, list(datasets.REQUIRED_KEYS) + ["timeouts"])

    no_term = make_transitions(terminal_every=0)
    rows2, layout2 = to_rows(no_term)
    assert not layout2.terminal and rows2.shape[1] == 2 * OBS + ACT + 1   # terminals modelled only if any is 1
    back2 = from_rows(rows2, layout2)
    assert not back2["terminals"].any() and not back2["timeouts"].any()
    assert to_rows(no_term, model_terminals=True)[1].terminal
    with pytest.raises(ValueError, match="rows must have shape"):
        from_rows(rows2, layout)


# ------------------------------------------------------------------------------------------- upsample
class SampleSpy:
    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def sample(self, n, **kw):
        self.calls.append(n)
        return self.model.sample(n, **kw)


def test_chunked_npz_writes_exactly_n_rows(tmp_path, fitted, data, monkeypatch):
    model, rows, layout = fitted

    def forbidden(*a, **k):
        raise AssertionError("upsample must stream, not build the whole array for np.savez")
    monkeypatch.setattr(np, "savez", forbidden)
    monkeypatch.setattr(np, "savez_compressed", forbidden)
    spy = SampleSpy(model)
    out = tmp_path / "syn.npz"
    s = upsample(data, out, num_samples=103, model=spy, chunk_size=10, progress=False)
    assert s["chunks"] == 11 and s["num_synthetic"] == 103 and s["num_real"] == 0
    assert max(spy.calls) <= 10 and sum(spy.calls) == 103      # never more than one chunk at a time
    assert "ZIP_STORED" in s["writer"]
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert sorted(zf.namelist()) == sorted(f"{k}.npy" for k in list(datasets.REQUIRED_KEYS) + ["timeouts"])
    got = load_transitions(out)
    assert all(len(v) == 103 for v in got.values())
    assert set(np.unique(got["terminals"])) <= {0.0, 1.0}
    assert not got["timeouts"].any()                               # synthetic rows: no time limits
    assert np.isfinite(got["observations"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.compression.json", "syn.npz"]  # no temp left
    js = json.loads((tmp_path / "syn.compression.json").read_text())
    assert js["num_samples"] == 103 and js["compression"]["original_floats"] == 300 * layout.dim


def test_action_bounds_clip_the_synthetic_actions_only(tmp_path, fitted, data):
    model, rows, layout = fitted
    kw = dict(num_samples=120, model=model, chunk_size=50, progress=False, write_json=False, seed=3)
    free = upsample(data, tmp_path / "free.npz", **kw)
    got_free = load_transitions(tmp_path / "free.npz")
    # no bounds: actions as generated; the summary counts rows outside the real data's range
    lo, hi = data["actions"].min(0), data["actions"].max(0)
    outside = ((got_free["actions"] < lo) | (got_free["actions"] > hi)).any(1).sum()
    assert free["synthetic_actions_outside_real_range"] == outside
    assert free["action_bounds"] is None and free["synthetic_actions_clipped"] is None
    tight = (-0.5, 0.5)
    assert (np.abs(got_free["actions"]) > 0.5).any()   # else the test below proves nothing

    # same seed, per-dimension bounds: dim 0 clipped to +-0.5, dim 1 to +-1; everything else identical
    s = upsample(data, tmp_path / "clip.npz", action_bounds=([-0.5, -1.0], [0.5, 1.0]), **kw)
    got = load_transitions(tmp_path / "clip.npz")
    expect = got_free["actions"].copy()
    expect[:, 0] = np.clip(expect[:, 0], *tight)
    expect[:, 1] = np.clip(expect[:, 1], -1.0, 1.0)
    np.testing.assert_array_equal(got["actions"], expect)
    for k in ("observations", "rewards", "next_observations", "terminals"):
        np.testing.assert_array_equal(got[k], got_free[k])
    assert s["synthetic_actions_clipped"] == (
        (np.abs(got_free["actions"][:, 0]) > 0.5) | (np.abs(got_free["actions"][:, 1]) > 1.0)).sum()
    assert s["action_bounds"] == [[-0.5, -1.0], [0.5, 1.0]]

    # in a mixture the real rows keep their actions (real actions reach +-1), the synthetic ones are clipped
    upsample(data, tmp_path / "mix.npz", action_bounds=tight, mix=0.5, **kw)
    got = load_transitions(tmp_path / "mix.npz")
    real = {o.tobytes(): a for o, a in zip(data["observations"], data["actions"])}
    is_real = np.array([o.tobytes() in real for o in got["observations"]])
    assert is_real.sum() == 60
    np.testing.assert_array_equal(got["actions"][is_real], [real[o.tobytes()] for o in got["observations"][is_real]])
    assert (np.abs(got["actions"][is_real]) > 0.5).any()
    assert (np.abs(got["actions"][~is_real]) <= 0.5).all()


@pytest.mark.parametrize("bounds,match", [
    ((1.0, -1.0), "low <= high"), ((float("nan"), 1.0), "NaN"), (([-1, -1, -1], 1.0), "2 values"),
    ((-1.0,), "pair"), ("-1 1", "pair")])
def test_bad_action_bounds_are_refused_before_training(tmp_path, data, bounds, match, monkeypatch):
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=match):
        upsample(data, tmp_path / "o.npz", num_samples=10, config=tiny_config(), action_bounds=bounds,
                 progress=False)
    x = np.zeros((20, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="transition data"):
        upsample(x, tmp_path / "o.npy", num_samples=10, config=tiny_config(), action_bounds=(-1, 1), progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("relevance", ["reward", "curiosity"])
def test_relevance_is_refused_before_training_not_ignored(tmp_path, data, relevance, monkeypatch):
    # upsample fits an unconditional model: a relevance setting would be silently ignored
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=rf"config.relevance='{relevance}'.*unconditional.*relevance=None"):
        upsample(data, tmp_path / "o.npz", num_samples=10, config=tiny_config(relevance=relevance), progress=False)
    assert not list(tmp_path.iterdir())


def test_hdf5_output_preallocated(tmp_path, fitted, data):
    model, rows, layout = fitted
    out = tmp_path / "syn.hdf5"
    s = upsample(data, out, num_samples=57, model=model, chunk_size=8, progress=False, write_json=False)
    assert s["chunks"] == 8 and "preallocated" in s["writer"]
    with h5py.File(out, "r") as f:
        assert f["observations"].shape == (57, OBS) and f["terminals"].shape == (57,)
        assert f["observations"].chunks[0] <= 8
    got = load_transitions(out)
    assert len(got["rewards"]) == 57 and "timeouts" in got


def test_npy_array_upsample(tmp_path):
    x = np.random.default_rng(0).standard_normal((200, 5)).astype(np.float32) * [1, 2, 3, 4, 5]
    np.save(tmp_path / "lat.npy", x)
    s = upsample(tmp_path / "lat.npy", tmp_path / "syn.npy", num_samples=45, config=tiny_config(),
                 train_steps=100, chunk_size=20, progress=False)
    y = np.load(tmp_path / "syn.npy")
    assert y.shape == (45, 5) and y.dtype == np.float32 and s["chunks"] == 3 and s["layout"] is None
    assert s["compression"]["original_floats"] == 200 * 5


@pytest.mark.parametrize("mix,num_samples,chunk", [(0.5, 600, 64), (0.3, 101, 10), (0.5, 1500, 500)])
def test_mixture_ratio(tmp_path, fitted, data, mix, num_samples, chunk):
    model, rows, layout = fitted
    out = tmp_path / "mix.npz"
    s = upsample(data, out, num_samples=num_samples, model=model, mix=mix, chunk_size=chunk, progress=False,
                 write_json=False, seed=3)
    n_real = round(mix * num_samples)
    assert (s["num_real"], s["num_synthetic"]) == (n_real, num_samples - n_real)
    got_rows, _ = to_rows(load_transitions(out), model_terminals=True)
    real = row_set(rows)
    is_real = np.array([r.tobytes() in real for r in got_rows])
    assert len(got_rows) == num_samples and is_real.sum() == n_real
    if num_samples == 2 * len(rows):        # seed E.2: every real row exactly once + as many synthetic
        assert row_set(got_rows[is_real]) == real
    # real rows are spread over the chunks, not all at the front
    first = is_real[:chunk].sum()
    assert abs(first - mix * chunk) <= 1
    # real rows keep their timeouts; synthetic ones get 0
    got = load_transitions(out)
    assert got["timeouts"][~is_real].sum() == 0


def test_mixture_real_rows_keep_their_terminals_where_the_model_has_none(tmp_path, data):
    """A model without the terminal column (``model_terminals=False``) must not erase the real rows' flags."""
    rows, layout = to_rows(data, model_terminals=False)
    model = offline.make_model(layout, rows.shape[1], tiny_config())
    model.fit(rows)
    out = tmp_path / "mix.npz"
    upsample(data, out, num_samples=600, model=model, mix=0.5, chunk_size=64, progress=False, write_json=False)
    got = load_transitions(out)
    got_rows, _ = to_rows(got, model_terminals=False)
    by_row = {r.tobytes(): (t, o) for r, t, o in zip(rows, data["terminals"], data["timeouts"])}
    is_real = np.array([r.tobytes() in by_row for r in got_rows])
    assert is_real.sum() == 300
    flags = np.array([by_row[r.tobytes()] for r in got_rows[is_real]])
    np.testing.assert_array_equal(got["terminals"][is_real], flags[:, 0])     # each real row its own terminal
    np.testing.assert_array_equal(got["timeouts"][is_real], flags[:, 1])
    assert got["terminals"][is_real].sum() == data["terminals"].sum() == 30
    assert got["terminals"][~is_real].sum() == 0                               # synthetic: not modelled, 0


def test_upsample_refuses_to_overwrite_its_input(tmp_path, data, monkeypatch):
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("refused before training"))
    src = tmp_path / "data.npz"
    np.savez(src, **data)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="would overwrite the dataset"):
        upsample(src, src, num_samples=10, config=tiny_config(), progress=False)
    (tmp_path / "link.npz").symlink_to(src)
    with pytest.raises(ValueError, match="would overwrite the dataset"):
        upsample(tmp_path / "link.npz", src, num_samples=10, config=tiny_config(), progress=False)
    assert src.read_bytes() == before


# ------------------------------------------------------------------------------------------- compression
def test_compression_matches_hand_count(tmp_path, fitted):
    model, rows, layout = fitted
    n, d = rows.shape
    hand_params = sum(p.numel() for p in model.model.parameters())
    path = tmp_path / "m.pt"
    model.save(path)
    c = compression_report(n, d, model, path)
    assert c["original_floats"] == n * d == 300 * 10
    assert c["diffusion_params"] == hand_params
    assert c["compression"] == pytest.approx(n * d / hand_params)
    assert c["model_file_bytes"] == path.stat().st_size and c["model_file"] == str(path)
    assert c["file_compression"] == pytest.approx(4 * n * d / path.stat().st_size)
    assert "compression" in offline.format_compression(c)
    # Table 5 arithmetic: walker2d medium, 1M x 42 FP32s vs 6.5M params -> 6.5x
    assert 1_000_000 * 42 / 6.5e6 == pytest.approx(6.46, abs=0.01)
    unsaved = compression_report(n, d, model)
    assert unsaved["model_file"] is None and unsaved["model_file_bytes"] > 4 * hand_params


def test_save_model_and_reload(tmp_path, data):
    out = tmp_path / "syn.npz"
    s = upsample(data, out, num_samples=20, config=tiny_config(), train_steps=50, chunk_size=20,
                 save_model=tmp_path / "m.pt", progress=False)
    assert s["compression"]["model_file"] == str(tmp_path / "m.pt")
    m = TransitionDiffusion.load(tmp_path / "m.pt")
    assert m.dim == s["dim"] and m.num_params == s["compression"]["diffusion_params"]
    assert m.normalizer.terminal_dims == (s["dim"] - 1,)
    assert s["fit"]["steps"] == 50


# ------------------------------------------------------------------------------------------- report
def test_report_png_and_json(tmp_path, data, monkeypatch):
    syn = make_transitions(seed=5, terminal_every=4)
    monkeypatch.setitem(sys.modules, "mujoco", None)   # no simulator: the envs extra is missing
    r = report(data, syn, out_png=tmp_path / "rep.png", env_id="HalfCheetah-v5", max_hist_rows=100)
    assert (tmp_path / "rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads((tmp_path / "rep.json").read_text())
    assert js["num_real"] == 300 and len(js["columns"]) == 2 * OBS + ACT + 1
    assert js["histogram_columns"] == ["obs_0", "obs_1", "obs_2", "action_0", "action_1", "reward"]
    col = {c["name"]: c for c in js["columns"]}
    assert col["obs_1"]["real_mean"] == pytest.approx(data["observations"][:, 1].mean(), abs=1e-6)
    assert col["reward"]["synthetic_std"] == pytest.approx(syn["rewards"].std(), rel=1e-5)
    assert js["terminal_rate"] == {"real": pytest.approx(0.1), "synthetic": pytest.approx(0.25)}
    assert js["fidelity"] is None and 'pip install "synther-buffer[envs]"' in js["fidelity_note"]
    text = report_mod.format_stats(r)
    assert "terminal rate: real 0.100000, synthetic 0.250000" in text


def test_report_plain_arrays_and_width_mismatch(tmp_path):
    a = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    r = report(a, a + 1, out_json=tmp_path / "r.json")
    assert [c["name"] for c in r["columns"]] == ["dim_0", "dim_1", "dim_2", "dim_3"]
    assert r["summary"]["median_std_ratio"] == pytest.approx(1.0)
    assert r["terminal_rate"] == {"real": None, "synthetic": None} and (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="columns"):
        report(a, a[:, :3])
