"""``synther train`` (synther_buffer.train) end to end, and the shared helpers in synther_buffer.results."""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synther_buffer import cli, results
from synther_buffer import train as train_mod

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tiny, fast settings: Pendulum (200-step episodes), UTD 2, a 200-step diffusion fit.
TINY = ["--env", "Pendulum-v1", "--preset", "tiny", "--total-steps", "300", "--utd", "2",
        "--train-steps", "200", "--eval-every", "100", "--eval-episodes", "1", "--device", "cpu",
        "--threads", "1", "--quiet"]


def _synther_exe() -> list:
    exe = Path(sys.executable).with_name("synther")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "synther_buffer.cli"]


def test_train_help_lists_flags():
    r = subprocess.run(_synther_exe() + ["train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--env", "--total-steps", "--preset", "--seed", "--utd", "--retrain-every", "--out",
                 "--threads", "--device", "--eval-every", "--eval-episodes", "--learning-starts",
                 "--no-synther", "--real-ratio"):
        assert flag in r.stdout, flag
    assert "cheetah-run" in r.stdout and "demo" in r.stdout


def test_train_tiny_run_writes_results_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", *TINY, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    # the final table
    for needle in ("final eval return", "SynthER retrains", "wall time", "RL (env steps + agent updates)",
                   "diffusion training", "diffusion sampling", "evaluation", str(out / "learning_curve.png")):
        assert needle in text, needle
    # CSV: evaluations at 0, 100, 200, 300 with finite returns
    with open(out / "eval_returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_step"]) for r in rows] == [0, 100, 200, 300]
    assert all(math.isfinite(float(r["mean_return"])) and float(r["std_return"]) >= 0 for r in rows)
    assert all(-2000 < float(r["mean_return"]) <= 0 for r in rows)  # Pendulum's reward range
    # JSON: config, evals, retrains at env step 200 (tiny preset), a timing split that adds up
    d = json.loads((out / "results.json").read_text())
    assert d["config"]["env"] == "Pendulum-v1" and d["config"]["learning_starts"] == 100
    assert d["config"]["synther"]["retrain_every"] == 200 and d["config"]["synther"]["train_steps"] == 200
    assert d["retrain_count"] == 1 and d["retrains"][0]["env_step"] == 200
    assert d["retrains"][0]["fit_seconds"] > 0 and d["retrains"][0]["generate_seconds"] > 0
    assert d["buffer_stats"]["env_steps"] == 300 and d["buffer_stats"]["num_synthetic"] > 0
    t = d["timing_seconds"]
    assert set(t) >= {"total", "setup", "rl", "diffusion_fit", "diffusion_sample", "eval"}
    assert t["diffusion_fit"] == pytest.approx(d["retrains"][0]["fit_seconds"], abs=1e-3)
    parts = sum(v for k, v in t.items() if k != "total")
    assert parts == pytest.approx(t["total"], rel=0.02, abs=0.05)
    assert d["final_eval"]["env_step"] == 300 and len(d["evals"]) == 4
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG_MAGIC


def test_train_no_synther_baseline(tmp_path, capsys):
    out = tmp_path / "base"
    rc = cli.main(["train", *TINY, "--total-steps", "150", "--learning-starts", "100", "--eval-every", "0",
                   "--no-synther", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "results.json").read_text())
    assert d["retrain_count"] == 0 and d["config"]["synther"] is None and "buffer_stats" not in d
    assert [e["env_step"] for e in d["evals"]] == [0, 150]
    assert "plain replay" in capsys.readouterr().out


def test_train_bad_inputs_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--env", "NoSuchEnv-v9", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown environment id" in capsys.readouterr().err
    assert cli.main(["train", "--total-steps", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--total-steps" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--real-ratio", "1.5", "--out", str(tmp_path / "z")]) == 2
    assert "real_ratio" in capsys.readouterr().err


def test_demo_defaults_fit_the_cpu_budget():
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    args = p.parse_args([])
    assert args.env == "dm_control/cheetah-run-v0" and args.utd == 20 and args.preset == "demo"
    assert args.total_steps == 1_750 and args.learning_starts is None  # -> min_real = 1000
    cfg = train_mod.synther_config(args)
    assert cfg.train_steps == 5_000 and cfg.num_generate == 25_000 and cfg.width == 256
    # retrains happen at env steps >= min_real on the retrain_every grid: 1000 and 1500 for the defaults
    grid = [s for s in range(cfg.retrain_every, args.total_steps + 1, cfg.retrain_every)]
    due = sorted({max(s, cfg.min_real) for s in grid if max(s, cfg.min_real) <= args.total_steps})
    assert due == [1000, 1500]
    assert train_mod.synther_config(p.parse_args(["--preset", "tiny", "--retrain-every", "50"])).retrain_every == 50
    assert cfg.compile is False and train_mod.synther_config(p.parse_args(["--compile"])).compile is True
    assert cfg.precision == "fp32"
    assert train_mod.synther_config(p.parse_args(["--precision", "bf16"])).precision == "bf16"


# ------------------------------------------------------------------------------- synther_buffer.results
class _CountdownEnv:
    """Episodes of `length` steps; reward = the action; terminates (not truncates) on odd episodes."""

    def __init__(self, length=5):
        self.length, self.episode, self.t = length, 0, 0

    def reset(self, seed=None):
        self.episode += 1
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        odd = self.episode % 2 == 1
        return np.zeros(2, np.float32), float(action), end and odd, end and not odd, {}


def test_evaluate_runs_full_episodes():
    assert results.evaluate(lambda obs: 2.0, _CountdownEnv(5), 3) == [10.0, 10.0, 10.0]
    with pytest.raises(ValueError):
        results.evaluate(lambda obs: 0.0, _CountdownEnv(), 0)


def test_timing_split_attributes_time():
    t = results.TimingSplit()
    t.add("diffusion_fit", 0.0)
    with t.section("eval"):
        pass
    t.start -= 10.0          # pretend 10 s passed since the start, of which 3 s were fitting
    t._last_mark -= 10.0
    t.add("diffusion_fit", 3.0)
    setup = t.mark("setup")
    assert setup == pytest.approx(7.0, abs=0.1)
    d = t.as_dict()
    assert d["total"] == pytest.approx(10.0, abs=0.1) and d["diffusion_fit"] == 3.0
    assert sum(v for k, v in d.items() if k != "total") == pytest.approx(d["total"], abs=0.1)
    c = results.TimingSplit(concurrent=("diffusion_fit",))
    c.start -= 5.0
    c._last_mark -= 5.0
    c.add("diffusion_fit", 4.0)    # overlapped the loop: not subtracted from RL
    assert c.as_dict()["rl"] == pytest.approx(5.0, abs=0.1)


def test_retrain_tracker_sums_each_retrain():
    stats = {"retrain_count": 0, "env_steps": 0, "last_fit_seconds": 0.0, "last_generate_seconds": 0.0,
             "last_train_loss": float("nan")}
    timing = results.TimingSplit()
    tr = results.RetrainTracker(lambda: dict(stats), timing)
    assert not tr.poll()
    stats.update(retrain_count=1, env_steps=1000, last_fit_seconds=2.0, last_generate_seconds=1.0, last_train_loss=0.5)
    assert tr.poll() and not tr.poll()
    stats.update(retrain_count=2, env_steps=1500, last_fit_seconds=3.0, last_generate_seconds=0.5)
    assert tr.poll()
    assert tr.count == 2 and tr.fit_seconds == 5.0 and tr.generate_seconds == 1.5
    assert [e["env_step"] for e in tr.events] == [1000, 1500] and tr.events[0]["loss"] == 0.5
    assert timing.sections["diffusion_fit"] == 5.0 and timing.sections["diffusion_sample"] == 1.5
    assert not results.RetrainTracker(None).poll()


def test_results_and_monitor_write_csv_json_png(tmp_path):
    env = _CountdownEnv(4)
    stats = {"retrain_count": 0, "env_steps": 0}
    res = results.Results(tmp_path / "r", config={"x": np.float32(1.5), "bad": float("nan"), "p": tmp_path},
                          title="t")
    mon = results.TrainingMonitor(res, total_steps=25, eval_every=10, eval_episodes=2, eval_env=env,
                                  policy_fn=lambda o: 1.0, stats_fn=lambda: dict(stats), progress=False)
    for step in range(1, 26):
        if step == 12:
            stats.update(retrain_count=1, env_steps=12, last_fit_seconds=0.1, last_generate_seconds=0.1)
        mon.step(step)
    summary = mon.finish(extra={"note": "ok"})
    assert [r["env_step"] for r in res.rows] == [0, 10, 20, 25]
    assert [r["retrains"] for r in res.rows] == [0, 0, 1, 1]
    d = json.loads(res.json_path.read_text())
    assert d["config"] == {"x": 1.5, "bad": None, "p": str(tmp_path)}
    assert d["retrain_count"] == 1 and d["note"] == "ok" and d["final_eval"]["mean_return"] == 4.0
    assert res.png_path.read_bytes()[:8] == PNG_MAGIC
    assert res.csv_path.read_text().splitlines()[0].startswith("env_step,mean_return,std_return")
    table = results.format_summary(summary, title="T")
    assert "4.0 +- 0.0 (2 episodes at env step 25)" in table and "(at env steps 12)" in table
