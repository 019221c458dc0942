"""The copyable training scripts in integrations/ run end to end and write plausible results."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
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


def test_sb3_sac_async_retrain(sb3_sac, tmp_path):
    """--async-retrain: retrains run in the background, every one is recorded, and their seconds are
    reported as concurrent (not subtracted from the RL time)."""
    out = tmp_path / "async"
    assert sb3_sac.main([*PENDULUM, *TINY, "--retrain-every", "100", "--async-retrain", "--checkpoint-every", "50",
                         "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 100, 200, 300])
    assert d["config"]["synther"]["async_retrain"] is True
    assert d["retrain_count"] == 3 and d["buffer_stats"]["retrain_count"] == 3
    assert d["concurrent_sections"] == ["diffusion_fit", "diffusion_sample"]
    # each retrain trained on the data of its scheduled step and was swapped in then or later
    assert [e["data_env_step"] for e in d["retrains"]] == [100, 200, 300]
    assert all(e["env_step"] >= e["data_env_step"] for e in d["retrains"])
    assert json.loads((out / "checkpoint" / "run.json").read_text())["env_steps"] == 300


def test_sb3_sac_warm_start(sb3_sac, tmp_path):
    """--warm-start: the first retrain is a full fit, the later ones warm at --warm-start-steps (issue 18)."""
    out = tmp_path / "warm"
    assert sb3_sac.main([*PENDULUM, *TINY, "--retrain-every", "100", "--warm-start", "--warm-start-steps", "40",
                         "--eval-every", "0", "--out", str(out)]) == 0
    d = json.loads((out / "results.json").read_text())
    assert d["config"]["synther"]["warm_start"] is True and d["config"]["synther"]["warm_start_steps"] == 40
    assert [e["warm"] for e in d["retrains"]] == [False, True, True]
    assert d["buffer_stats"]["warm_retrains"] == 2 and d["buffer_stats"]["last_fit_warm"] is True


def test_custom_sac_warm_start_flags(custom_sac, monkeypatch):
    args = custom_sac.parse_args(["--warm-start", "--warm-start-steps", "7"])
    assert args.warm_start is True and args.warm_start_steps == 7
    assert custom_sac.parse_args([]).warm_start is False


def test_sb3_run_header_names_the_retrain_mode():
    """The run's header line says when retrains are warm, in the background or relevance-guided."""
    from synther_buffer import SynthERConfig
    from synther_buffer.sb3_run import retrain_mode_text

    fast = SynthERConfig.preset("fast")
    assert retrain_mode_text(fast) == ""
    assert retrain_mode_text(fast.replace(warm_start=True)) == \
        "; warm retrains after the first (a quarter of a cold fit's steps)"
    assert "(3,000 steps)" in retrain_mode_text(fast.replace(warm_start=True, warm_start_steps=3000))
    assert retrain_mode_text(fast.replace(async_retrain=True)) == "; in a background thread"
    text = retrain_mode_text(fast.replace(relevance="curiosity", guidance_scale=2.0, relevance_top_frac=0.25))
    assert text == "; PGR: curiosity relevance, guidance scale 2, sampled at the top 25% of real scores"


def test_sb3_sac_checkpoint_deferred_during_background_retrain(tmp_path):
    """A due checkpoint waits until no background retrain is running (pickling would block on it)."""
    from synther_buffer.checkpoint import RunCheckpoint
    from synther_buffer.sb3_run import MonitorCallback

    ckpt = RunCheckpoint(tmp_path / "checkpoint", every=10)
    busy, saved = [True], []

    def save():
        saved.append(cb.num_timesteps)
        ckpt.last_saved = cb.num_timesteps

    cb = MonitorCallback(None, ckpt, save, busy=lambda: busy[0])
    for step in range(1, 26):
        cb.num_timesteps = step
        busy[0] = 10 <= step < 13 or step == 20
        cb._on_rollout_start()
    assert saved == [13, 21]


def test_sb3_sac_utd20_on_dmc_cheetah(sb3_sac, tmp_path):
    out = tmp_path / "cheetah"
    assert sb3_sac.main(["--env", "dm_control/cheetah-run-v0", "--total-steps", "220", "--eval-every", "0",
                         *TINY, "--learning-starts", "200", "--utd", "20", "--retrain-every", "100",
                         "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 220])
    assert d["retrain_count"] == 2                               # min_real 100: at 100 and 200
    assert all(0 <= e["mean_return"] <= 1000 for e in d["evals"])  # DMC rewards are in [0, 1]
    # SAC's learned temperature with each evaluation: 1 before any update, lower after 20 x 20 of them
    assert d["evals"][0]["agent"]["alpha"] == 1.0 and 0 < d["evals"][-1]["agent"]["alpha"] < 1.0


def _wait_for_checkpoint(proc, run_json: Path, min_step: int, timeout: float = 240.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(run_json.read_text())["env_steps"]
            if step >= min_step:
                return step
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at >= {min_step} env steps (exit {proc.poll()})")


def test_sb3_sac_resumes_after_kill(sb3_sac, tmp_path, capsys):
    """SIGKILL a run after a checkpoint; --resume continues from it: evaluations up to the checkpoint
    are kept, the SynthER schedule and counters continue, the buffer holds every real transition."""
    out = tmp_path / "run"
    flags = [*PENDULUM, *TINY, "--retrain-every", "100", "--checkpoint-every", "100", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "sb3_sac.py"), *flags, "--total-steps", "3000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        ckpt_step = _wait_for_checkpoint(proc, out / "checkpoint" / "run.json", 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL        # killed mid-run, not finished
    before = json.loads((out / "checkpoint" / "run.json").read_text())
    kept = [r for r in before["monitor"]["rows"]]
    assert [r["env_step"] for r in kept] == list(range(0, before["env_steps"] + 1, 100))

    total = before["env_steps"] + 200
    assert sb3_sac.main([*flags, "--total-steps", str(total), "--resume"]) == 0
    assert f"resumed at env step {before['env_steps']:,}" in capsys.readouterr().out
    d = _check_outputs(out, range(0, total + 1, 100))
    assert d["evals"][:len(kept)] == kept                        # nothing before the checkpoint was redone
    assert d["env_steps"] == total
    # retrains every 100 env steps from min_real (100): the resumed run continued the schedule
    assert [e["env_step"] for e in d["retrains"]] == list(range(100, total + 1, 100))
    assert d["buffer_stats"]["num_real"] == total and d["buffer_stats"]["env_steps"] == total
    assert d["timing_seconds"]["total"] > before["monitor"]["timing"]["total"]
    agent = sb3_sac.SAC.load(out / "checkpoint" / "agent.zip", device="cpu")
    assert agent.num_timesteps == total and agent._n_updates == (total - 100) * 2
    assert ckpt_step >= 200


def test_sb3_sac_resume_refuses_other_settings(sb3_sac, tmp_path):
    out = tmp_path / "run"
    flags = [*PENDULUM, *TINY, "--total-steps", "120", "--eval-every", "0", "--checkpoint-every", "100",
             "--no-synther", "--out", str(out)]
    assert sb3_sac.main(flags) == 0
    assert json.loads((out / "checkpoint" / "run.json").read_text())["env_steps"] == 120
    with pytest.raises(SystemExit, match="--seed 0 .now 1"):
        sb3_sac.main([*flags, "--seed", "1", "--resume"])
    with pytest.raises(SystemExit, match="overwrite the oldest real data"):
        sb3_sac.main([*flags, "--total-steps", "500", "--resume"])
    assert sb3_sac.main([*flags, "--resume"]) == 0           # nothing left to do: final eval only
    with pytest.raises(SystemExit):
        sb3_sac.parse_args(["--checkpoint-every", "-1"])


@pytest.mark.parametrize("script", ["sb3_sac", "custom_sac"])
@pytest.mark.parametrize("flag,value", [("--utd", "0"), ("--utd", "-1"), ("--total-steps", "0"), ("--batch-size", "0"),
                                        ("--learning-starts", "-5"), ("--threads", "0"), ("--eval-episodes", "0"),
                                        ("--eval-every", "-5"), ("--real-ratio", "2"), ("--real-ratio", "nan"),
                                        ("--seed", "-1"), ("--checkpoint-every", "-1")])
def test_scripts_refuse_out_of_range_flags_before_building_anything(script, flag, value, request, capsys):
    mod = request.getfixturevalue(script)
    with pytest.raises(SystemExit) as e:
        mod.parse_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--tau", "2"), ("--tau", "0"), ("--gamma", "1.5"), ("--policy-updates", "0"),
                                        ("--lr", "0")])
def test_custom_sac_refuses_out_of_range_agent_flags(custom_sac, flag, value, capsys):
    with pytest.raises(SystemExit):
        custom_sac.parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_custom_sac_script_subprocess(tmp_path):
    out = tmp_path / "custom"
    r = subprocess.run([sys.executable, str(SCRIPTS / "custom_sac.py"), *PENDULUM, *TINY, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SAC (custom loop) + SynthER" in r.stdout and "final eval return" in r.stdout
    d = _check_outputs(out, [0, 100, 200, 300])
    assert d["retrains"][0]["env_step"] == 200 and d["buffer_stats"]["num_real"] == 300
    assert all(-2000 < e["mean_return"] <= 0 for e in d["evals"])


def test_custom_sac_resumes_after_kill(custom_sac, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*PENDULUM, *TINY, "--retrain-every", "100", "--checkpoint-every", "100", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "custom_sac.py"), *flags, "--total-steps", "3000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait_for_checkpoint(proc, out / "checkpoint" / "run.json", 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = json.loads((out / "checkpoint" / "run.json").read_text())
    total = before["env_steps"] + 200
    assert custom_sac.main([*flags, "--total-steps", str(total), "--resume"]) == 0
    assert f"resumed at env step {before['env_steps']:,}" in capsys.readouterr().out
    d = _check_outputs(out, range(0, total + 1, 100))
    assert d["evals"][:len(before["monitor"]["rows"])] == before["monitor"]["rows"]
    assert [e["env_step"] for e in d["retrains"]] == list(range(100, total + 1, 100))
    assert d["buffer_stats"]["num_real"] == total
    agent = custom_sac.torch.load(out / "checkpoint" / "agent.pt", weights_only=True)
    assert agent["q_optimizer"]["state"][0]["step"].item() == (total - 100) * 2   # UTD 2 after 100 random steps
    with pytest.raises(SystemExit, match="--num-q 2 .now 3"):
        custom_sac.main([*flags, "--total-steps", str(total), "--resume", "--num-q", "3"])
    with pytest.raises(SystemExit, match="beyond the checkpointed run's"):   # its buffer holds `total` rows
        custom_sac.main([*flags, "--total-steps", str(total + 100), "--resume"])


def test_custom_redq_utd20_on_dmc_cheetah(custom_sac, tmp_path, capsys):
    out = tmp_path / "redq"
    assert custom_sac.main(["--env", "dm_control/cheetah-run-v0", "--total-steps", "250", "--eval-every", "0",
                            *TINY, "--num-q", "10", "--num-min", "2", "--utd", "20", "--learning-starts", "200",
                            "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 250])
    assert d["config"]["num_q"] == 10 and d["retrains"][0]["env_step"] == 200
    # the temperature (updated once per env step, as REDQ's code does) and the policy's entropy estimate
    first, last = d["evals"][0]["agent"], d["evals"][-1]["agent"]
    assert first == {"alpha": 1.0} and 0 < last["alpha"] < 1.0 and math.isfinite(last["policy_entropy"])
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


@pytest.mark.parametrize("script", ["sb3_sac", "custom_sac"])
def test_precision_flag_reaches_the_diffusion_model(script, tmp_path, request):
    """--precision bf16: the run retrains and samples with SynthERConfig.precision="bf16" and says so."""
    out = tmp_path / script
    assert request.getfixturevalue(script).main([*PENDULUM, *TINY, "--total-steps", "150", "--eval-every", "0",
                                                 "--retrain-every", "100", "--precision", "bf16",
                                                 "--out", str(out)]) == 0
    d = _check_outputs(out, [0, 150])
    assert d["config"]["synther"]["precision"] == "bf16"
