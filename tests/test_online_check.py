"""Issue 24's online check: ``sb3_sac.py --save-pool`` / ``--fixed-budget``, the ``synther_utd20_fixed`` arm
and ``benchmarks.utd20 --dump-pool`` (the final pool scored by the simulator oracle into pool_fidelity.json)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import utd20
from synther_buffer import SynthERConfig
from synther_buffer.datasets import load_transitions
from synther_buffer.sb3_run import real_pool_path, synther_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--train-steps", "200", "--hidden", "64", "--utd", "2", "--eval-episodes", "1",
        "--device", "cpu", "--threads", "1", "--quiet"]
CHEETAH = ["--env", "cheetah-run", "--total-steps", "220", "--eval-every", "0", "--learning-starts", "200",
           "--retrain-every", "100"]


@pytest.fixture(scope="module")
def sb3_sac():
    spec = importlib.util.spec_from_file_location("integration_sb3_sac_online", REPO / "integrations" / "sb3_sac.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _oracle():
    pytest.importorskip("dm_control")
    from synther_buffer import oracle
    return oracle


# ------------------------------------------------------------------------------------ sb3_sac.py --save-pool
def test_save_pool_writes_the_final_pool_and_real_rows_that_load_and_score(sb3_sac, tmp_path, capsys):
    oracle = _oracle()
    out, pool = tmp_path / "run", tmp_path / "dump" / "final_pool.npz"
    assert sb3_sac.main([*CHEETAH, *TINY, "--out", str(out), "--save-pool", str(pool)]) == 0
    assert "saved the final synthetic pool" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    stats = res["buffer_stats"]
    syn, real = load_transitions(pool), load_transitions(real_pool_path(pool))
    assert real_pool_path(pool) == tmp_path / "dump" / "final_pool.real.npz"
    # every pool row (not a draw from it), every real transition, in the dataset keys
    assert len(syn["observations"]) == stats["num_synthetic"] > 0
    assert len(real["observations"]) == stats["num_real"] == 220
    for d in (syn, real):
        assert d["observations"].shape[1] == d["next_observations"].shape[1] == 17 and d["actions"].shape[1] == 6
        assert d["rewards"].shape == d["terminals"].shape == (len(d["observations"]),)
        assert not d["terminals"].any()                       # DMC never terminates
    with np.load(real_pool_path(pool)) as z:   # the real file is the buffer's real rows, in order
        np.testing.assert_array_equal(z["rewards"][:5], real["rewards"][:5])
    # the pool is the buffer's own: its rows are what the model generated, not real rows
    assert not np.isin(syn["rewards"], real["rewards"]).all()
    # scored against the real rows' std; the real rows themselves are the oracle's floor (~0)
    fid = oracle.score_transitions("cheetah-run", syn, reference=real)
    assert fid["normalization"] == "reference" and fid["n_scored"] == len(syn["observations"])
    assert np.isfinite(fid["dynamics_mse"]) and fid["dynamics_mse"] > 0.01
    assert oracle.score_transitions("cheetah-run", real, reference=real)["dynamics_mse"] < 1e-6
    assert not list((tmp_path / "dump").glob("*.tmp*"))


def test_save_pool_is_refused_for_a_plain_replay_buffer(sb3_sac, tmp_path):
    with pytest.raises(SystemExit, match=r"--save-pool .*plain replay buffer \(--no-synther\)"):
        sb3_sac.main([*CHEETAH, *TINY, "--no-synther", "--out", str(tmp_path / "r"),
                      "--save-pool", str(tmp_path / "p.npz")])
    assert not (tmp_path / "r").exists() and not (tmp_path / "p.npz").exists()   # refused before any work
    with pytest.raises(SystemExit, match=r"\.npz"):
        sb3_sac.main([*CHEETAH, *TINY, "--out", str(tmp_path / "r"), "--save-pool", str(tmp_path / "p.hdf5")])


def test_save_pool_before_the_first_retrain_writes_nothing(sb3_sac, tmp_path, capsys):
    pool = tmp_path / "p.npz"
    assert sb3_sac.main(["--env", "Pendulum-v1", "--total-steps", "120", "--eval-every", "0", "--learning-starts",
                         "100", "--retrain-every", "1000", *TINY, "--out", str(tmp_path / "r"),
                         "--save-pool", str(pool)]) == 0
    assert "synthetic pool is empty" in capsys.readouterr().err and not pool.exists()


def test_fixed_budget_turns_the_data_size_rule_off(sb3_sac):
    ruled = SynthERConfig.preset("tiny").replace(train_steps_rows=500, train_steps_power=1.0, max_train_steps=3_000)
    new = synther_config(ruled, sb3_sac.parse_args(TINY))
    old = synther_config(ruled, sb3_sac.parse_args([*TINY, "--fixed-budget"]))
    assert new.train_steps_rows == 500 and new.train_steps_for(1_000) == 400
    assert old.train_steps_rows is None and old.train_steps_for(1_000) == old.train_steps == 200
    assert {k for k, v in old.to_dict().items() if new.to_dict()[k] != v} == {"train_steps_rows"}   # one switch
    # a namespace without the flag (synther train's) keeps the rule
    ns = argparse.Namespace(device="cpu", seed=0, quiet=True)
    assert synther_config(ruled, ns).train_steps_rows == 500


# ------------------------------------------------------------------------------------ benchmarks.utd20
def test_fixed_arm_is_opt_in_and_differs_from_synther_utd20_by_one_flag():
    p = utd20.PRESETS["cpu"]
    u = lambda arm: utd20.Unit("cheetah-run", arm, 0)   # noqa: E731
    a, b = utd20.unit_args(p, u("synther_utd20")), utd20.unit_args(p, u("synther_utd20_fixed"))
    assert b == a + ["--fixed-budget"]
    assert utd20.ARMS["synther_utd20_fixed"].synther
    assert all("synther_utd20_fixed" not in utd20.PRESETS[n].arms for n in ("cpu", "paper"))
    # its recorded config is the one it runs: the data-size rule off, nothing else changed
    cs = {arm: utd20.unit_settings(p, u(arm))["synther_config"] for arm in ("synther_utd20", "synther_utd20_fixed")}
    assert cs["synther_utd20_fixed"]["train_steps_rows"] is None
    assert {k for k in cs["synther_utd20"] if cs["synther_utd20"][k] != cs["synther_utd20_fixed"][k]} <= \
        {"train_steps_rows"}
    ruled = dataclasses.replace(p, synther_overrides={**p.synther_overrides, "train_steps_rows": 10_000})
    cr = {arm: utd20.unit_settings(ruled, u(arm))["synther_config"] for arm in ("synther_utd20", "synther_utd20_fixed")}
    assert cr["synther_utd20"]["train_steps_rows"] == 10_000 and cr["synther_utd20_fixed"]["train_steps_rows"] is None


def test_committed_campaign_units_stay_done():
    """The new flags and arm leave the committed cpu units' settings alone (a deliberate library-preset
    change may make SynthER units stale; the plain-SAC ones never should)."""
    p = utd20.PRESETS["cpu"]
    out = REPO / "benchmarks" / "results" / "cpu"
    markers = [json.loads(m.read_text()) for m in sorted(out.glob(f"*/*/seed*/{utd20.UNIT_FILE}"))]
    units = [utd20.Unit(**m["unit"]) for m in markers if m.get("status") == "done"]
    if not units:
        pytest.skip("no committed cpu units")
    plain = [x for x in units if not utd20.ARMS[x.arm].synther]
    assert plain and {x.key: utd20.unit_status(p, x, out, out) for x in plain} == {x.key: "done" for x in plain}


def test_other_total_steps_get_their_own_roots(capsys):
    assert utd20.main(["--preset", "cpu", "--envs", "cheetah-run", "--arms", "synther_utd20", "synther_utd20_fixed",
                       "--seeds", "1", "--total-steps", "30000", "--dump-pool", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert f"out {REPO / 'benchmarks' / 'results' / 'cpu_30000steps'}" in cap.err
    assert "cpu_30000steps" in cap.err.splitlines()[-1] and "utd20/cpu_30000steps" in cap.err   # work root too
    lines = cap.out.splitlines()
    assert len(lines) == 2 and all("--total-steps 30000" in line for line in lines)
    assert lines[1].endswith("--fixed-budget") and not lines[0].endswith("--fixed-budget")
    # the preset's own budget, or an explicit --out, keeps the given roots
    assert utd20.main(["--preset", "cpu", "--envs", "cheetah-run", "--arms", "sac_utd1", "--seeds", "1",
                       "--dry-run"]) == 0
    assert f"out {REPO / 'benchmarks' / 'results' / 'cpu'}\n" in capsys.readouterr().err


def _smoke_cheetah(out: Path, work: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "benchmarks.utd20", "--preset", "smoke", "--envs", "cheetah-run",
           "--arms", "synther_utd20", "sac_utd20", "--seeds", "1", "--out", str(out), "--work", str(work),
           "--heartbeat", "30", *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_dump_pool_unit_writes_pool_fidelity_json_and_the_report_table(tmp_path):
    _oracle()
    out, work = tmp_path / "results", tmp_path / "work"
    log = _smoke_cheetah(out, work, "--dump-pool")
    d_out, d = (utd20.Unit("cheetah-run", "synther_utd20", 0).dir(r) for r in (out, work))
    f = json.loads((d_out / utd20.POOL_FIDELITY_FILE).read_text())
    fid = f["fidelity"]
    assert fid["normalization"] == "reference" and fid["env_id"] == "cheetah-run"
    assert fid["n_scored"] == f["num_synthetic"] > 0 and np.isfinite(fid["dynamics_mse"])
    assert f["real_floor"]["dynamics_mse"] < 1e-6 and f["num_real"] == 200
    assert f["last_retrain_env_step"] == 200 and f["last_fit_train_steps"] == 200   # smoke: fixed 200 steps
    assert (d_out / utd20.POOL_FIDELITY_FILE).stat().st_size < 20_000
    assert "final pool fidelity: dynamics MSE" in log
    # the pools stay in the work dir (gitignored *.npz), never in the results
    assert (d / utd20.POOL_FILE).exists() and (d / "final_pool.real.npz").exists()
    assert not list(out.rglob("*.npz"))
    # the flag is not part of the unit's settings; the plain-SAC unit gets no --save-pool and no score
    marker = json.loads((d_out / utd20.UNIT_FILE).read_text())
    assert "--save-pool" in marker["command"] and "--save-pool" not in marker["settings"]["args"]
    sac = utd20.Unit("cheetah-run", "sac_utd20", 0)
    assert not (sac.dir(out) / utd20.POOL_FIDELITY_FILE).exists()
    assert "--save-pool" not in json.loads((sac.dir(out) / utd20.UNIT_FILE).read_text())["command"]
    # the report has the table, summary.json the numbers
    assert "Final synthetic pool fidelity" in (out / "summary.md").read_text()
    s = json.loads((out / "summary.json").read_text())
    assert [(r["arm"], r["fidelity"]["dynamics_mse"]) for r in s["pool_fidelity"]] == \
        [("synther_utd20", fid["dynamics_mse"])]

    # a done unit without its score (killed while scoring) is scored on the next --dump-pool pass, not re-run
    (d_out / utd20.POOL_FIDELITY_FILE).unlink()
    p = utd20.PRESETS["smoke"]
    assert utd20.run_unit(p, utd20.Unit("cheetah-run", "synther_utd20", 0), out, 1, "cpu", work=work,
                          dump_pool=True) == "skipped"
    again = json.loads((d_out / utd20.POOL_FIDELITY_FILE).read_text())["fidelity"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in fid.items() if k != "seconds"}
    # without --dump-pool: nothing scored, the done units still skipped
    (d_out / utd20.POOL_FIDELITY_FILE).unlink()
    log2 = _smoke_cheetah(out, work)
    assert log2.count("skip cheetah-run/") == 2 and not (d_out / utd20.POOL_FIDELITY_FILE).exists()


def test_score_pool_notes_what_it_could_not_score(tmp_path):
    u = utd20.Unit("Pendulum-v1", "synther_utd20", 0)
    f = utd20.score_pool(u, tmp_path)
    assert f["fidelity"] is None and "no pool dump" in f["note"]
    n = 50
    rows = {"observations": np.zeros((n, 3), np.float32), "actions": np.zeros((n, 1), np.float32),
            "rewards": np.arange(n, dtype=np.float32), "next_observations": np.ones((n, 3), np.float32),
            "terminals": np.zeros(n, np.float32)}
    np.savez(tmp_path / utd20.POOL_FILE, **rows)
    np.savez(real_pool_path(tmp_path / utd20.POOL_FILE), **rows)
    f = utd20.score_pool(u, tmp_path)   # Pendulum's observation does not determine the simulator state
    assert f["fidelity"] is None and "fidelity scoring skipped" in f["note"]


def test_save_pool_failing_midway_keeps_the_previous_pair(tmp_path, monkeypatch):
    """The synthetic and real files replace the old ones only once both are written."""
    import synther_buffer.sb3_run as sb3_run

    def rows(value):
        return {k: np.full((3, 2), value, np.float32) for k in ("observations", "actions", "next_observations")} | {
            "rewards": np.full(3, value, np.float32), "terminals": np.zeros(3, np.float32)}

    class Buffer:
        def __init__(self, value):
            self.value = value

        def wait(self):
            return False

        def synthetic_transitions(self):
            return rows(self.value)

        def real_transitions(self):
            return rows(-self.value)

    pool = tmp_path / "final_pool.npz"
    assert sb3_run.save_pool(Buffer(1.0), pool) == (pool, real_pool_path(pool))
    real_savez, calls = np.savez, []

    def failing_savez(file, **arrays):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real_savez(file, **arrays)

    monkeypatch.setattr(sb3_run.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        sb3_run.save_pool(Buffer(2.0), pool)
    assert load_transitions(pool)["rewards"][0] == 1.0 and load_transitions(real_pool_path(pool))["rewards"][0] == -1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_pool.npz", "final_pool.real.npz"]
