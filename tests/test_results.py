"""synther_buffer.results: a TrainingMonitor continued from its checkpointed state."""

from __future__ import annotations

import csv
import json
import time

import numpy as np

from synther_buffer.results import Results, TimingSplit, TrainingMonitor


class _Env:
    """A 3-step episode env whose return is the constant action times 3."""

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), float(action), False, self.t >= 3, {}


class _Stats:
    def __init__(self):
        self.s = {"retrain_count": 0, "last_fit_seconds": 2.0, "last_generate_seconds": 1.0, "env_steps": 0}

    def retrain(self, step):
        self.s.update(retrain_count=self.s["retrain_count"] + 1, env_steps=step)

    def __call__(self):
        return dict(self.s)


def _monitor(out, stats, action, eval_at_start=True):
    return TrainingMonitor(Results(out), total_steps=40, eval_every=10, eval_episodes=1, eval_env=_Env(),
                           policy_fn=lambda obs: action, stats_fn=stats, timing=TimingSplit(), progress=False,
                           eval_at_start=eval_at_start)


def test_monitor_state_dict_round_trip(tmp_path):
    stats = _Stats()
    m = _monitor(tmp_path, stats, 1.0)
    for step in range(1, 21):
        if step == 15:
            stats.retrain(step)
        m.step(step)
    state = json.loads(json.dumps(m.state_dict()))           # JSON-able, as RunCheckpoint stores it
    for step in range(21, 26):                                 # work after the checkpoint, then a "kill"
        m.step(step)
    m.step(30)                                                  # an eval at 30 that the resumed run redoes

    time.sleep(0.01)
    resumed = _monitor(tmp_path, stats, 2.0, eval_at_start=False)
    resumed.load_state_dict(state)
    with open(tmp_path / "eval_returns.csv") as f:              # the eval at 30 was dropped from the files
        assert [int(r["env_step"]) for r in csv.DictReader(f)] == [0, 10, 20]
    stats.retrain(35)
    for step in range(21, 41):
        resumed.step(step)
    summary = resumed.finish()
    assert [r["env_step"] for r in resumed.results.rows] == [0, 10, 20, 30, 40]
    assert [r["mean_return"] for r in resumed.results.rows] == [3.0, 3.0, 3.0, 6.0, 6.0]   # new policy after 20
    assert [e["env_step"] for e in summary["retrains"]] == [15, 35]
    t = summary["timing_seconds"]
    assert t["diffusion_fit"] == 4.0 and t["diffusion_sample"] == 2.0       # each retrain counted once
    assert t["total"] >= state["timing"]["total"]
    assert json.loads((tmp_path / "results.json").read_text())["env_steps"] == 40


def test_timing_split_load_adds_the_checkpointed_time():
    t = TimingSplit()
    t.add("eval", 1.5)
    t.load_state_dict({"total": 100.0, "eval": 2.0, "rl": 90.0, "setup": 8.0})
    d = t.as_dict()
    assert d["eval"] == 3.5 and d["setup"] == 8.0 and d["rl"] >= 90.0 and 100.0 <= d["total"] < 101.0


def test_monitor_records_the_agent_state_with_each_evaluation_in_the_json_only(tmp_path):
    temperature = {"alpha": 1.0}
    m = TrainingMonitor(Results(tmp_path), total_steps=20, eval_every=10, eval_episodes=1, eval_env=_Env(),
                        policy_fn=lambda obs: 1.0, timing=TimingSplit(), progress=False,
                        agent_stats_fn=lambda: dict(temperature))
    for step in range(1, 21):
        temperature["alpha"] = 1.0 / (1 + step)
        m.step(step)
    m.finish()
    evals = json.loads((tmp_path / "results.json").read_text())["evals"]
    assert [e["agent"]["alpha"] for e in evals] == [1.0, 1 / 11, 1 / 21]   # the value at each evaluation
    with open(tmp_path / "eval_returns.csv") as f:
        assert "alpha" not in f.readline()                                  # the CSV's columns stay fixed
    m.results.restore([{k: v for k, v in e.items() if k != "agent"} for e in evals])  # rows from before
    assert len(m.results.rows) == 3 and "agent" not in m.results.rows[0]
