"""``synther train`` (synther_buffer.train) end to end, and the shared helpers in synther_buffer.results."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synther_buffer import cli, results
from synther_buffer import train as train_mod
from synther_buffer.validation import check_run_flags

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
    assert "--real-ratio must be a number in [0, 1]" in capsys.readouterr().err
    # a flag the run would take and ignore
    assert cli.main(["train", *TINY, "--warm-start-steps", "50", "--out", str(tmp_path / "w")]) == 2
    assert "--warm-start-steps does nothing without --warm-start" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--guidance-scale", "3", "--out", str(tmp_path / "g")]) == 2
    assert "--guidance-scale does nothing without --relevance" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("w", "g"))


def test_no_synther_baseline_warns_of_synther_flags_and_starts_where_synther_would(monkeypatch):
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    with pytest.warns(UserWarning, match="--retrain-every, --warm-start ignored"):
        check_run_flags(p.parse_args(["--no-synther", "--retrain-every", "50", "--warm-start"]))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_run_flags(p.parse_args(["--no-synther", "--preset", "tiny"]))   # --preset: see below
    # the baseline's learning_starts is the preset's min_real, as the SynthER run's (tiny: 100)
    import synther_buffer.sb3_run as sb3_run

    seen = []
    monkeypatch.setattr(sb3_run, "SB3Run", lambda *a, extra_config, **k: seen.append(extra_config["learning_starts"]))
    for flags in ([], ["--no-synther"]):
        train_mod._setup(p.parse_args(["--env", "Pendulum-v1", "--preset", "tiny", "--total-steps", "300",
                                       "--device", "cpu", *flags]))
    assert seen == [100, 100]


DESIGN = Path(__file__).resolve().parents[1].parent / "shared" / "DESIGN.md"   # beside the repository


def _demo_setup(monkeypatch) -> dict:
    """What ``synther train`` with no flags builds, up to the run: its config, SAC's learning_starts, the
    buffer size (``SB3Run`` is replaced by a recorder, so no env or agent is made)."""
    import synther_buffer.sb3_run as sb3_run

    seen = {}

    def record(args, make_agent, *, synther, title, buffer_size, extra_config):
        seen.update(args=args, config=synther, buffer_size=buffer_size, **extra_config)

    monkeypatch.setattr(sb3_run, "SB3Run", record)
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    train_mod._setup(p.parse_args([]))
    seen["description"] = p.description
    return seen


def _demo_retrains(config, buffer_size: int, total_steps: int) -> list:
    """Env steps at which the demo's SB3 buffer retrains over ``total_steps`` single-env adds (diffusion faked)."""
    from gymnasium import spaces

    from synther_buffer import GenerativeReplayBuffer

    buf = GenerativeReplayBuffer(buffer_size, spaces.Box(-np.inf, np.inf, (17,), np.float32),
                                 spaces.Box(-1.0, 1.0, (6,), np.float32), device="cpu", config=config,
                                 model_terminals=False)
    steps, retrain = [], buf.retrain
    buf.retrain = lambda: steps.append(buf.pool.env_steps) or retrain()
    zeros = np.zeros((1, 17), np.float32)
    for _ in range(total_steps):
        buf.add(zeros, zeros, np.zeros((1, 6), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32), [{}])
    return steps


def test_demo_retrains_twice_and_learns_from_the_first_pool(monkeypatch, fake_diffusion):
    """The demo's promise (module docstring): two retrains, at env steps 1,000 and 1,500, with SAC's
    updates starting when the first synthetic pool can exist, on the schedule the buffer really runs."""
    demo = _demo_setup(monkeypatch)
    args = demo["args"]
    assert args.env == "dm_control/cheetah-run-v0" and args.utd == 20 and args.preset == "demo"
    assert _demo_retrains(demo["config"], demo["buffer_size"], args.total_steps) == [1_000, 1_500]
    assert demo["learning_starts"] == 1_000 and fake_diffusion.calls == 2


def test_demo_fits_the_cpu_budget_it_claims(monkeypatch, fake_diffusion):
    """The demo "finishes in minutes" on a 2-core machine ("a few minutes", module docstring; taken here as
    at most 10), checked against the machine's measured rates (DESIGN.md's environment notes where it is
    beside the repository): SAC's gradient steps at UTD 20 plus the diffusion fits alone, a lower bound
    on the run's time, must fit."""
    demo = _demo_setup(monkeypatch)
    args, cfg = demo["args"], demo["config"]
    assert "a few minutes" in train_mod.__doc__ and "minutes" in demo["description"]
    sac_steps_per_s, fit_steps, fit_seconds = 114.0, 15_000, 118.0     # DESIGN.md, as copied here
    if DESIGN.is_file():
        text = DESIGN.read_text()
        sac_steps_per_s = float(re.search(r"does ~(\d+) gradient steps/s", text).group(1))
        row = re.search(r"\| 10K \| none \((\d+)K steps\) \| (\d+) s \|", text)   # the fast preset's fit
        fit_steps, fit_seconds = int(row.group(1)) * 1_000, float(row.group(2))
    retrains = len(_demo_retrains(cfg, demo["buffer_size"], args.total_steps))
    updates = (args.total_steps - demo["learning_starts"]) * args.utd
    seconds = updates / sac_steps_per_s + retrains * cfg.train_steps * fit_seconds / fit_steps
    assert seconds <= 10 * 60, (seconds, updates, retrains)
    from synther_buffer import SynthERConfig

    fast = SynthERConfig.preset("fast")
    assert (cfg.width, cfg.depth) == (fast.width, fast.depth)   # the fit rate measured is the fast preset's network


def test_train_flags_reach_the_synther_config():
    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)
    demo = train_mod.synther_config(p.parse_args([]))
    assert (demo.train_steps, demo.num_generate, demo.retrain_every) == (5_000, 25_000, 750)
    assert demo.compile is False and demo.precision == "fp32"
    assert train_mod.synther_config(p.parse_args(["--preset", "tiny", "--retrain-every", "50"])).retrain_every == 50
    assert train_mod.synther_config(p.parse_args(["--compile"])).compile is True
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
    stats.update(retrain_count=2, env_steps=1530, last_fit_seconds=3.0, last_generate_seconds=0.5,
                 last_retrain_env_step=1500)   # a background retrain on data up to 1,500, swapped in at 1,530
    assert tr.poll()
    assert tr.count == 2 and tr.fit_seconds == 5.0 and tr.generate_seconds == 1.5
    assert [e["env_step"] for e in tr.events] == [1000, 1530] and tr.events[0]["loss"] == 0.5
    assert [e["data_env_step"] for e in tr.events] == [1000, 1500]
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
