"""``--relevance`` on ``synther train`` and the integration scripts (Prioritized Generative Replay)."""

from __future__ import annotations

import json

import pytest

from synther_buffer import cli
from tests.test_integrations import PENDULUM, TINY, _load

SMALL = ["--total-steps", "250", "--eval-every", "0"]   # one retrain (tiny preset: every 200 env steps)


def _results(out):
    return json.loads((out / "results.json").read_text())


def test_synther_train_relevance_curiosity(tmp_path):
    out = tmp_path / "run"
    rc = cli.main(["train", "--env", "Pendulum-v1", "--preset", "tiny", "--total-steps", "250", "--utd", "2",
                   "--train-steps", "200", "--eval-every", "0", "--eval-episodes", "1", "--device", "cpu",
                   "--threads", "1", "--quiet", "--relevance", "curiosity", "--guidance-scale", "1.5",
                   "--out", str(out)])
    assert rc == 0
    d = _results(out)
    assert d["config"]["synther"]["relevance"] == "curiosity" and d["config"]["synther"]["guidance_scale"] == 1.5
    assert d["retrain_count"] == 1 and d["buffer_stats"]["relevance"] == "curiosity"


def test_synther_train_refuses_unknown_relevance(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--relevance", "novelty"])


def test_sb3_sac_script_relevance(tmp_path):
    out = tmp_path / "sb3"
    assert _load("sb3_sac").main([*PENDULUM, *TINY, *SMALL, "--relevance", "reward", "--out", str(out)]) == 0
    d = _results(out)
    assert d["config"]["synther"]["relevance"] == "reward" and d["buffer_stats"]["relevance"] == "reward"


def test_custom_sac_script_td_relevance(tmp_path):
    out = tmp_path / "custom"
    assert _load("custom_sac").main([*PENDULUM, *TINY, *SMALL, "--relevance", "td", "--out", str(out)]) == 0
    d = _results(out)
    assert d["buffer_stats"]["relevance"] == "custom" and d["buffer_stats"]["retrain_count"] == 1
