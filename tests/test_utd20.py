"""benchmarks/utd20/: smoke run, resume, report and the IQM / stratified bootstrap helpers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import utd20

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ statistics
def test_iqm_known_numbers():
    assert utd20.iqm(np.arange(1, 9)) == pytest.approx(4.5)            # mean of 3, 4, 5, 6
    assert utd20.iqm([0, 0, 1, 1, 1, 1, 100, 100]) == pytest.approx(1.0)
    assert utd20.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)           # int(1.25) = 1 cut at each end
    assert utd20.iqm([[1, 100], [2, 3]]) == pytest.approx(2.5)          # flattens a [runs, tasks] matrix
    assert utd20.iqm([7.0]) == 7.0
    from scipy.stats import trim_mean
    x = np.random.default_rng(0).normal(size=(7, 5))
    assert utd20.iqm(x) == pytest.approx(trim_mean(x, 0.25, axis=None))
    with pytest.raises(ValueError):
        utd20.iqm([])


def test_stratified_bootstrap_resamples_within_tasks():
    # Task 0 scores all 0, task 1 all 1: every stratified resample keeps half zeros, half ones, so the
    # IQM is exactly 0.5 in every resample (an unstratified bootstrap would vary).
    scores = np.array([[0.0, 1.0]] * 3)
    assert utd20.stratified_bootstrap_ci(scores, reps=200) == (pytest.approx(0.5), pytest.approx(0.5))
    assert utd20.stratified_bootstrap_ci(np.full((4, 3), 2.0), reps=50) == (2.0, 2.0)
    x = np.random.default_rng(1).normal(size=(10, 3))
    lo, hi = utd20.stratified_bootstrap_ci(x, reps=500)
    assert lo < utd20.iqm(x) < hi


def test_aggregate_scores_numpy_backend_and_rliable_agree():
    x = {"a": np.random.default_rng(2).uniform(size=(6, 3)), "b": np.random.default_rng(3).uniform(size=(6, 3))}
    ours = utd20.aggregate_scores(x, reps=300, use_rliable=False)
    for k in x:
        assert ours[k]["backend"] == "numpy"
        assert ours[k]["iqm"] == pytest.approx(utd20.iqm(x[k]))
        assert ours[k]["mean"] == pytest.approx(x[k].mean())
        assert ours[k]["iqm_ci"][0] <= ours[k]["iqm"] <= ours[k]["iqm_ci"][1]
    if utd20.stats._rliable() is None:
        pytest.skip("rliable not installed")
    theirs = utd20.aggregate_scores(x, reps=300, use_rliable=True)
    for k in x:
        assert theirs[k]["backend"] == "rliable"
        assert theirs[k]["iqm"] == pytest.approx(ours[k]["iqm"])
        assert theirs[k]["mean"] == pytest.approx(ours[k]["mean"])
        assert np.allclose(theirs[k]["iqm_ci"], ours[k]["iqm_ci"], atol=0.1)


def test_normaliser():
    f, how = utd20.normaliser("cheetah-run", [])
    assert f(500.0) == 0.5 and "DMC" in how
    f, _ = utd20.normaliser("dm_control/walker-walk-v0", [])
    assert f(1000.0) == 1.0
    f, how = utd20.normaliser("HalfCheetah-v5", [])
    assert f(-280.178953) == pytest.approx(0.0) and f(12135.0) == pytest.approx(1.0) and "D4RL" in how
    f, how = utd20.normaliser("Pendulum-v1", [-1500.0, -500.0])
    assert f(-500.0) == 1.0 and f(-1000.0) == 0.5 and "min-max" in how


# ------------------------------------------------------------------------------------ plan / status / report
def _fake_unit(out: Path, preset, env: str, arm: str, seed: int, final: float, steps=(0, 500, 1000)):
    u = utd20.Unit(env, arm, seed)
    d = u.dir(out)
    d.mkdir(parents=True)
    evals = [{"env_step": s, "mean_return": final * s / steps[-1]} for s in steps]
    timing = {"total": 100.0, "rl": 60.0, "diffusion_fit": 20.0 if "synther" in arm else 0.0,
              "diffusion_sample": 10.0 if "synther" in arm else 0.0, "eval": 5.0, "setup": 5.0}
    (d / "results.json").write_text(json.dumps({
        "config": {"env": env}, "evals": evals, "timing_seconds": timing, "retrain_count": 2,
        "final_eval": {"env_step": steps[-1], "mean_return": final, "std_return": 1.0, "episodes": 5}}))
    (d / utd20.UNIT_FILE).write_text(json.dumps({
        "status": "done", "unit": {"env": env, "arm": arm, "seed": seed},
        "settings": utd20.unit_settings(preset, u), "wall_seconds": 100.0}))
    return u


def test_unit_status_done_stale_partial_todo(tmp_path):
    p = utd20.PRESETS["smoke"]
    done = _fake_unit(tmp_path, p, "Pendulum-v1", "sac_utd1", 0, -1000.0)
    assert utd20.unit_status(p, done, tmp_path) == "done"
    # the same directory under other settings (another step budget) is stale, not done
    p2 = dataclasses.replace(p, total_steps=300)
    assert utd20.unit_status(p2, done, tmp_path) == "stale"
    # the SynthER arm also records its resolved SynthERConfig: a changed library preset makes it stale
    syn = _fake_unit(tmp_path, p, "Pendulum-v1", "synther_utd20", 0, -1000.0)
    assert utd20.unit_status(p, syn, tmp_path) == "done"
    marker = json.loads((syn.dir(tmp_path) / utd20.UNIT_FILE).read_text())
    marker["settings"]["synther_config"]["sample_steps"] += 1
    (syn.dir(tmp_path) / utd20.UNIT_FILE).write_text(json.dumps(marker))
    assert utd20.unit_status(p, syn, tmp_path) == "stale"
    del marker["settings"]["synther_config"]   # a marker from before the config was recorded: flags decide
    (syn.dir(tmp_path) / utd20.UNIT_FILE).write_text(json.dumps(marker))
    assert utd20.unit_status(p, syn, tmp_path) == "done"
    partial = utd20.Unit("Pendulum-v1", "sac_utd20", 0)
    partial.dir(tmp_path).mkdir(parents=True)
    (partial.dir(tmp_path) / "eval_returns.csv").write_text("env_step,mean_return\n0,-1200\n")
    assert utd20.unit_status(p, partial, tmp_path) == "partial"
    assert utd20.unit_status(p, utd20.Unit("Pendulum-v1", "redq_utd20", 0), tmp_path) == "todo"
    # seed-major order
    units = utd20.plan(p, ["a", "b"], ["sac_utd1", "sac_utd20"], 2)
    assert [u.seed for u in units] == [0] * 4 + [1] * 4 and units[1] == utd20.Unit("a", "sac_utd20", 0)
    # a restart runs the interrupted units first, each group keeping the plan's order
    units = utd20.plan(p, ["Pendulum-v1"], ["sac_utd1", "synther_utd20", "sac_utd20", "redq_utd20"], 1)
    ordered = utd20.resume_first(units, [utd20.unit_status(p, u, tmp_path) for u in units])
    assert [u.arm for u in ordered] == ["sac_utd20", "sac_utd1", "synther_utd20", "redq_utd20"]
    with pytest.raises(ValueError, match="statuses"):
        utd20.resume_first(units, ["todo"])


def test_unit_args_per_arm():
    p = utd20.PRESETS["cpu"]
    a = {arm: utd20.unit_args(p, utd20.Unit("cheetah-run", arm, 1)) for arm in utd20.ARMS}
    flag = lambda args, f: args[args.index(f) + 1]  # noqa: E731
    assert flag(a["sac_utd1"], "--utd") == "1" and "--no-synther" in a["sac_utd1"]
    assert flag(a["sac_utd20"], "--utd") == "20" and "--no-synther" in a["sac_utd20"]
    assert flag(a["synther_utd20"], "--utd") == "20" and "--no-synther" not in a["synther_utd20"]
    assert flag(a["synther_utd20"], "--preset") == "fast" and flag(a["synther_utd20"], "--retrain-every") == "2250"
    assert flag(a["redq_utd20"], "--num-q") == "10" and flag(a["redq_utd20"], "--num-min") == "2"
    assert "--no-synther" in a["redq_utd20"] and flag(a["redq_utd20"], "--utd") == "20"
    assert "--policy-updates" not in a["redq_utd20"]                           # REDQ's own schedule: the script's 1
    assert flag(a["redq_utd20_pu20"], "--policy-updates") == "20" and flag(a["redq_utd20_pu20"], "--num-q") == "10"
    assert a["synther_utd20_async"] == a["synther_utd20"] + ["--async-retrain"]
    assert "synther_utd20_async" not in utd20.PRESETS["paper"].arms and "--async-retrain" not in a["synther_utd20"]
    assert a["synther_utd20_warm"] == a["synther_utd20"] + ["--warm-start"]          # issue 18, opt-in
    assert "synther_utd20_warm" not in utd20.PRESETS["paper"].arms and "--warm-start" not in a["synther_utd20"]
    assert all(flag(v, "--seed") == "1" and flag(v, "--total-steps") == "10000" for v in a.values())
    assert utd20.unit_settings(p, utd20.Unit("x", "redq_utd20", 0))["script"] == "integrations/custom_sac.py"


def test_precision_flag_reaches_the_synther_arms_only_and_is_part_of_their_settings(tmp_path, capsys):
    p = utd20.PRESETS["smoke"]
    assert utd20.main(["--preset", "smoke", "--out", str(tmp_path), "--dry-run", "--precision", "bf16"]) == 0
    lines = {line.split()[1].rstrip(":"): line for line in capsys.readouterr().out.splitlines()}
    arm = lambda key: utd20.ARMS[key.split("/")[1]]  # noqa: E731  (keys: env/arm/seed)
    assert all(("--precision bf16" in line) == arm(key).synther for key, line in lines.items())
    assert sum(arm(key).synther for key in lines) == 5   # the smoke preset runs every arm: synther_utd20, async, warm, fixed, pgr
    # a unit finished in fp32 is stale under --precision bf16 (and done again without the flag)
    syn = _fake_unit(tmp_path, p, "Pendulum-v1", "synther_utd20", 0, -1000.0)
    bf16 = dataclasses.replace(p, synther_overrides={**p.synther_overrides, "precision": "bf16"})
    assert utd20.unit_settings(bf16, syn)["synther_config"]["precision"] == "bf16"
    assert utd20.unit_status(bf16, syn, tmp_path) == "stale"
    assert utd20.unit_status(p, syn, tmp_path) == "done"
    plain = _fake_unit(tmp_path, p, "Pendulum-v1", "sac_utd20", 0, -1000.0)
    assert utd20.unit_status(bf16, plain, tmp_path) == "done"   # no diffusion: unaffected
    with pytest.raises(SystemExit):
        utd20.main(["--preset", "smoke", "--out", str(tmp_path), "--dry-run", "--precision", "fp16"])


def test_late_return_is_the_mean_of_the_last_evaluations_in_step_order():
    evals = [(3000, 30.0), (1000, 10.0), (4000, 70.0), (2000, 20.0)]
    assert utd20.late_return(evals) == pytest.approx((20.0 + 30.0 + 70.0) / 3)
    assert utd20.late_return(evals, k=1) == 70.0
    assert utd20.late_return([(1000, 5.0)]) == 5.0                  # fewer than k: all of them
    with pytest.raises(ValueError):
        utd20.late_return([])


def test_report_with_two_envs_has_aggregates(tmp_path):
    p = utd20.PRESETS["cpu"]
    for env, scale in (("cheetah-run", 1.0), ("walker-walk", 2.0)):
        for seed in (0, 1, 2):
            _fake_unit(tmp_path, p, env, "sac_utd20", seed, 100.0 * scale + seed)
            _fake_unit(tmp_path, p, env, "synther_utd20", seed, 200.0 * scale + seed)
    s = utd20.write_report(tmp_path, reps=200)
    for name in ("summary.md", "summary.json", "final_returns.md", "final_returns.csv", "timing.csv",
                 "aggregate.csv", "curves_cheetah-run.png", "curves_walker-walk.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    agg = s["aggregate"]
    assert set(agg) == {"sac_utd20", "synther_utd20"}
    assert agg["synther_utd20"]["runs"] == 3 and agg["synther_utd20"]["tasks"] == 2
    # normalised: cheetah (100..102)/1000 and walker (200..202)/1000 -> IQM of the middle four
    assert agg["sac_utd20"]["iqm"] == pytest.approx(utd20.iqm([0.1, 0.101, 0.102, 0.2, 0.201, 0.202]))
    assert agg["synther_utd20"]["iqm"] > agg["sac_utd20"]["iqm"]
    fr = {(r["env"], r["arm"]): r for r in s["final_returns"]}
    assert fr[("cheetah-run", "synther_utd20")]["mean"] == pytest.approx(201.0)
    assert fr[("cheetah-run", "synther_utd20")]["n"] == 3
    # the mean of each run's last 3 evaluations (the fakes': 0, final / 2, final): final / 2 on average
    assert fr[("cheetah-run", "synther_utd20")]["late"]["mean"] == pytest.approx(100.5)
    assert fr[("cheetah-run", "synther_utd20")]["late"]["per_seed"] == {"0": 100.0, "1": 100.5, "2": 101.0}
    t = {r["arm"]: r for r in s["timing"]}
    assert t["synther_utd20"]["diffusion_fit"] == 20.0 and t["sac_utd20"]["diffusion_share"] == 0.0
    assert "IQM" in (tmp_path / "summary.md").read_text()


def test_report_leaves_out_units_finished_under_other_settings(tmp_path):
    p = utd20.PRESETS["cpu"]
    for seed in (0, 1):
        _fake_unit(tmp_path, p, "cheetah-run", "sac_utd20", seed, 100.0 + seed)
    old = dataclasses.replace(p, total_steps=5000)                 # seed 2 ran under another budget
    _fake_unit(tmp_path, old, "cheetah-run", "sac_utd20", 2, 999.0)
    assert utd20.write_report(tmp_path, reps=50)["final_returns"][0]["n"] == 3    # no preset: all of them
    s = utd20.write_report(tmp_path, reps=50, preset=p)
    assert s["final_returns"][0]["n"] == 2 and s["final_returns"][0]["mean"] == pytest.approx(100.5)
    assert [(u["arm"], u["seed"]) for u in s["stale"]] == [("sac_utd20", 2)]
    assert "Finished under other settings" in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------------------------ end to end
def _bench(out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "benchmarks.utd20", "--preset", "smoke", "--envs", "Pendulum-v1",
           "--arms", "sac_utd20", "synther_utd20", "--seeds", "1", "--out", str(out), "--heartbeat", "5", *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_smoke_run_writes_report_and_resume_skips_finished_units(tmp_path):
    out = tmp_path / "utd20"
    log1 = _bench(out, "--keep-checkpoints")
    assert log1.count("done Pendulum-v1/") == 2
    for name in ("summary.md", "summary.json", "final_returns.csv", "final_returns.md", "timing.csv",
                 "curves_Pendulum-v1.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert {r["arm"] for r in s["final_returns"]} == {"sac_utd20", "synther_utd20"}
    t = {r["arm"]: r for r in s["timing"]}
    assert t["synther_utd20"]["retrains"] >= 1 and t["synther_utd20"]["diffusion_fit"] > 0
    assert t["sac_utd20"]["diffusion_fit"] == 0
    units = {a: out / "Pendulum-v1" / a / "seed0" for a in ("sac_utd20", "synther_utd20")}
    for d in units.values():
        for f in ("eval_returns.csv", "results.json", "learning_curve.png", "unit.json"):
            assert (d / f).exists(), d / f
    mtimes = {a: (d / "results.json").stat().st_mtime_ns for a, d in units.items()}

    # Resume: a second invocation runs nothing.
    log2 = _bench(out)
    assert log2.count("skip Pendulum-v1/") == 2 and "start " not in log2
    assert {a: (d / "results.json").stat().st_mtime_ns for a, d in units.items()} == mtimes

    # An interrupted unit (no done marker) continues from its checkpoint (here: the final one, so only
    # the summary is redone); one without a checkpoint is re-run from scratch; finished ones are skipped.
    (units["sac_utd20"] / "unit.json").unlink()
    (units["sac_utd20"] / "leftover.txt").write_text("partial")
    log3 = _bench(out)
    assert "skip Pendulum-v1/synther_utd20/seed0" in log3
    assert "Pendulum-v1/sac_utd20/seed0: interrupted earlier; resuming from its checkpoint at env step 200" in log3
    assert (units["sac_utd20"] / "leftover.txt").exists()                  # the directory was kept
    resumed = json.loads((units["sac_utd20"] / "results.json").read_text())
    assert resumed["config"]["resume"] and "(resumed at env step 200)" in (units["sac_utd20"] / "stdout.log").read_text()
    assert [e["env_step"] for e in resumed["evals"]] == [0, 100, 200]
    assert (units["sac_utd20"] / "unit.json").exists() and not (units["sac_utd20"] / "checkpoint").exists()
    assert (units["synther_utd20"] / "results.json").stat().st_mtime_ns == mtimes["synther_utd20"]
    (units["synther_utd20"] / "unit.json").unlink()
    shutil.rmtree(units["synther_utd20"] / "checkpoint")
    log4 = _bench(out)
    assert "Pendulum-v1/synther_utd20/seed0: interrupted before its first checkpoint; re-running from scratch" in log4
    assert (units["synther_utd20"] / "unit.json").exists()

    # --report-only reads what is there.
    r = subprocess.run([sys.executable, "-m", "benchmarks.utd20", "--preset", "smoke", "--out", str(out),
                        "--report-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "synther_utd20" in r.stdout


def test_sigterm_with_parallel_units_stops_their_children_promptly(tmp_path):
    """--jobs 2: SIGTERM stops both running children at once (not after their units finish), starts no
    further unit, and leaves the units partial (to resume), not failed."""
    import contextlib
    import signal

    out = tmp_path / "utd20"
    cmd = [sys.executable, "-m", "benchmarks.utd20", "--preset", "smoke", "--envs", "Pendulum-v1",
           "--arms", "sac_utd1", "sac_utd20", "--seeds", "2", "--jobs", "2", "--total-steps", "200000",
           "--out", str(out), "--heartbeat", "600"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    running = [out / "Pendulum-v1" / a / "seed0" / utd20.RUNNING_FILE for a in ("sac_utd1", "sac_utd20")]
    deadline = time.time() + 120
    while not all(f.exists() for f in running) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert all(f.exists() for f in running), proc.communicate(timeout=60)[0]
    pids = [json.loads(f.read_text())["pid"] for f in running]
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    try:
        log = proc.communicate(timeout=60)[0]      # a hang here was the bug: the pool waited for whole units
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    for pid in pids:
        assert not utd20.units.pid_alive(pid) or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert log.count("interrupted after") == 2 and "FAILED" not in log, log
    assert "seed1" not in log.split("interrupted after")[-1]      # nothing started after the signal
    assert not (out / "Pendulum-v1" / "sac_utd1" / "seed1").exists()


# ------------------------------------------------------------------------------------ the cpu campaign
def test_cpu_campaign_plan_per_env_seeds_and_arm_envs():
    p = utd20.PRESETS["cpu"]
    units = utd20.plan(p, list(p.envs), list(p.arms))
    keys = {(u.env, u.arm, u.seed) for u in units}
    assert {u.env for u in units} == {"cheetah-run", "walker-walk", "reacher-hard"}
    assert {u.seed for u in units if u.env == "cheetah-run"} == {0, 1, 2}
    assert {u.seed for u in units if u.env != "cheetah-run"} == {0, 1}
    assert {u.env for u in units if u.arm == "redq_utd20"} == {"cheetah-run"}
    assert ("walker-walk", "synther_utd20", 1) in keys and ("reacher-hard", "sac_utd20", 0) in keys
    assert len(units) == 3 * 4 + 2 * 2 * 3                     # cheetah: 4 arms x 3 seeds; others: 3 arms x 2
    assert [u.seed for u in units] == sorted(u.seed for u in units)          # seed-major
    # an explicit --seeds N applies to every env (the arm restriction stays)
    assert {u.seed for u in utd20.plan(p, ["walker-walk"], ["sac_utd20", "redq_utd20"], 3)} == {0, 1, 2}
    assert not [u for u in utd20.plan(p, ["walker-walk"], ["redq_utd20"], 3)]


def test_separate_work_dir_keeps_only_small_files_in_out(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    log = _bench(out, "--work", str(work))
    assert log.count("done Pendulum-v1/") == 2
    for arm in ("sac_utd20", "synther_utd20"):
        kept = sorted(f.name for f in (out / "Pendulum-v1" / arm / "seed0").iterdir())
        assert kept == ["eval_returns.csv", "results.json", "unit.json"], kept
        assert (work / "Pendulum-v1" / arm / "seed0" / "stdout.log").exists()
        assert not (work / "Pendulum-v1" / arm / "seed0" / "checkpoint").exists()
    # done-ness is read from the results alone: a fresh work dir (another machine) re-runs nothing
    log2 = _bench(out, "--work", str(tmp_path / "elsewhere"))
    assert log2.count("skip Pendulum-v1/") == 2 and "start " not in log2
    # an interrupted unit resumes from the work dir's checkpoint
    shutil.rmtree(out / "Pendulum-v1" / "sac_utd20")
    log3 = _bench(out, "--work", str(work), "--keep-checkpoints")
    assert "start Pendulum-v1/sac_utd20/seed0" in log3 and (out / "Pendulum-v1" / "sac_utd20" / "seed0" / "unit.json").exists()
    r = subprocess.run([sys.executable, "-m", "benchmarks.utd20", "--preset", "smoke", "--out", str(out),
                        "--report-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "synther_utd20" in r.stdout


def test_report_header_names_a_results_root_inside_the_repo_relatively():
    assert utd20.units.repo_relative(utd20.REPO / "benchmarks" / "results" / "cpu") == str(Path("benchmarks/results/cpu"))


def test_probability_of_improvement_known_numbers_and_ci():
    # one task: x beats y in 3 of 4 pairs -> 0.75; a tie counts one half
    assert utd20.probability_of_improvement([[2.0, 4.0]], [[1.0, 3.0]]) == pytest.approx(0.75)
    assert utd20.probability_of_improvement([[1.0]], [[1.0]]) == pytest.approx(0.5)
    # averaged over tasks, each task with its own run counts
    assert utd20.probability_of_improvement([[5.0, 6.0, 7.0], [0.0]], [[1.0, 2.0], [9.0]]) == pytest.approx(0.5)
    lo, hi = utd20.probability_of_improvement_ci([[2.0, 4.0]], [[1.0, 3.0]], reps=500)
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    assert utd20.probability_of_improvement_ci([[10.0, 11.0]], [[1.0, 2.0]], reps=200) == (1.0, 1.0)
    with pytest.raises(ValueError):
        utd20.probability_of_improvement([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError):
        utd20.probability_of_improvement([[]], [[1.0]])


def test_report_has_poi_and_the_published_numbers(tmp_path):
    p = utd20.PRESETS["cpu"]
    for seed in (0, 1):
        _fake_unit(tmp_path, p, "cheetah-run", "sac_utd20", seed, 100.0 + seed)
        _fake_unit(tmp_path, p, "cheetah-run", "synther_utd20", seed, 200.0 + seed)
        _fake_unit(tmp_path, p, "walker-walk", "sac_utd20", seed, 300.0 + seed)
        _fake_unit(tmp_path, p, "walker-walk", "synther_utd20", seed, 50.0 + seed)
    s = utd20.write_report(tmp_path, reps=200)
    poi = {r["y"]: r for r in s["probability_of_improvement"]}
    assert set(poi) == {"sac_utd20"}                        # no REDQ units: no REDQ comparison
    assert poi["sac_utd20"]["poi"] == pytest.approx(0.5)     # wins every pair on one task, loses all on the other
    md = (tmp_path / "summary.md").read_text()
    assert "Probability of improvement" in md and "published, 100K steps" in md
    assert md.startswith(f"# UTD=20 benchmark: {tmp_path}\n")      # outside the repository: as given
    fr = (tmp_path / "final_returns.csv").read_text().splitlines()
    assert any(line.startswith("cheetah-run,synther_utd20,") and line.endswith(",729") for line in fr)
    assert any(line.startswith("walker-walk,sac_utd20,") and line.endswith(",-") for line in fr)
