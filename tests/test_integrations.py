"""The copyable training scripts in integrations/ run end to end and write plausible results."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "integrations"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small and fast: tiny diffusion preset with a 200-step fit, 64-wide nets, UTD 2, 1-episode evals.
TINY = ["--preset", "tiny", "--train-steps", "200", "--hidden", "64", "--utd", "2", "--learning-starts", "100",
        "--eval-episodes", "1", "--device", "cpu", "--threads", "1", "--quiet"]
PENDULUM = ["--env", "Pendulum-v1", "--total-steps", "300", "--eval-every", "100"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"integration_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def custom_sac():
    return _load("custom_sac")


@pytest.fixture(scope="module")
def sb3_sac():
    return _load("sb3_sac")


def _check_outputs(out: Path, steps, retrains_min: int = 1) -> dict:
    with open(out / "eval_returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_step"]) for r in rows] == list(steps)
    for r in rows:
        assert math.isfinite(float(r["mean_return"])) and float(r["std_return"]) >= 0
    d = json.loads((out / "results.json").read_text())
    assert [e["env_step"] for e in d["evals"]] == list(steps)
    assert d["retrain_count"] >= retrains_min
    assert d["timing_seconds"]["total"] > 0 and d["timing_seconds"]["rl"] > 0
    if retrains_min:
        assert d["timing_seconds"]["diffusion_fit"] > 0 and d["timing_seconds"]["diffusion_sample"] > 0
        assert d["buffer_stats"]["num_synthetic"] > 0
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG_MAGIC
    return d


def test_sb3_sac_script_subprocess(tmp_path):
    out = tmp_path / "sb3"
    r = subprocess.run([sys.executable, str(SCRIPTS / "sb3_sac.py"), *PENDULUM, *TINY, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final eval return" in r.stdout and "SynthER retrains" in r.stdout
    d = _check_outputs(out, [0, 100, 200, 300])
    assert d["retrains"][0]["env_step"] == 200
    assert all(-2000 < e["mean_return"] <= 0 for e in d["evals"])   # Pendulum's reward range
    assert d["config"]["script"] == "integrations/sb3_sac.py" and d["config"]["synther"]["train_steps"] == 200


def test_sb3_sac_no_synther_is_plain_replay(sb3_sac, tmp_path, capsys):
    out = tmp_path / "plain"
    assert sb3_sac.main([*PENDULUM, *TINY, "--total-steps", "150", "--eval-every", "0", "--no-synther",
                         "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 150], retrains_min=0)
    assert d["retrain_count"] == 0 and d["config"]["synther"] is None
    assert "no SynthER" in capsys.readouterr().out


def test_sb3_sac_utd20_on_dmc_cheetah(sb3_sac, tmp_path):
    out = tmp_path / "cheetah"
    assert sb3_sac.main(["--env", "dm_control/cheetah-run-v0", "--total-steps", "220", "--eval-every", "0",
                         *TINY, "--learning-starts", "200", "--utd", "20", "--retrain-every", "100",
                         "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 220])
    assert d["retrain_count"] == 2                               # min_real 100: at 100 and 200
    assert all(0 <= e["mean_return"] <= 1000 for e in d["evals"])  # DMC rewards are in [0, 1]


def test_custom_sac_script_subprocess(tmp_path):
    out = tmp_path / "custom"
    r = subprocess.run([sys.executable, str(SCRIPTS / "custom_sac.py"), *PENDULUM, *TINY, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SAC (custom loop) + SynthER" in r.stdout and "final eval return" in r.stdout
    d = _check_outputs(out, [0, 100, 200, 300])
    assert d["retrains"][0]["env_step"] == 200 and d["buffer_stats"]["num_real"] == 300
    assert all(-2000 < e["mean_return"] <= 0 for e in d["evals"])


def test_custom_redq_utd20_on_dmc_cheetah(custom_sac, tmp_path, capsys):
    out = tmp_path / "redq"
    assert custom_sac.main(["--env", "dm_control/cheetah-run-v0", "--total-steps", "250", "--eval-every", "0",
                            *TINY, "--num-q", "10", "--num-min", "2", "--utd", "20", "--learning-starts", "200",
                            "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 250])
    assert d["config"]["num_q"] == 10 and d["retrains"][0]["env_step"] == 200
    assert all(0 <= e["mean_return"] <= 1000 for e in d["evals"])
    assert "REDQ (custom loop) + SynthER" in capsys.readouterr().out


def test_custom_sac_no_synther_never_retrains(custom_sac, tmp_path):
    out = tmp_path / "plain"
    assert custom_sac.main([*PENDULUM, *TINY, "--total-steps", "250", "--eval-every", "0", "--no-synther",
                            "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 250], retrains_min=0)
    assert d["buffer_stats"]["retrain_count"] == 0 and d["buffer_stats"]["num_synthetic"] == 0
    assert d["config"]["synther"]["real_ratio"] == 1.0


def test_custom_sac_parts(custom_sac):
    import torch

    q = custom_sac.QEnsemble(3, 2, 16, num_q=5)
    assert q(torch.zeros(7, 3), torch.zeros(7, 2)).shape == (5, 7)
    # members are independent networks: different outputs on the same input
    out = q(torch.randn(4, 3), torch.randn(4, 2))
    assert not torch.allclose(out[0], out[1])
    actor = custom_sac.Actor(3, 2, 16)
    a, logp, det = actor.get_action(torch.randn(6, 3))
    assert a.shape == det.shape == (6, 2) and logp.shape == (6,)
    assert a.abs().max() <= 1 and det.abs().max() <= 1 and torch.isfinite(logp).all()
    with pytest.raises(SystemExit):
        custom_sac.parse_args(["--num-q", "2", "--num-min", "3"])


@pytest.mark.slow
def test_custom_sac_learns_pendulum(custom_sac, tmp_path):
    """Plain SAC (UTD 1, no SynthER) solves Pendulum in a few thousand steps: the loop is correct."""
    out = tmp_path / "learn"
    assert custom_sac.main(["--env", "Pendulum-v1", "--total-steps", "6000", "--learning-starts", "1000",
                            "--utd", "1", "--eval-every", "0", "--eval-episodes", "5", "--no-synther",
                            "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    d = json.loads((out / "results.json").read_text())
    assert d["final_eval"]["mean_return"] > -400, d["final_eval"]
