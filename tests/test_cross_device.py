"""Cross-device resume: checkpoints whose config says ``cuda`` load onto the device asked for (here the CPU).

Made on the CPU, then rewritten to say ``cuda`` (the config inside each file), as a GPU machine would have
written them: ``TransitionDiffusion.save``/``load(device=)``, ``GenerativeReplay.save``/``load(device=)``
and pickles, and the SB3 run checkpoint through ``integrations/sb3_sac.py --resume --device cpu``."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from synther_buffer import GenerativeReplay, SynthERConfig, TransitionDiffusion

from helpers import small, transitions  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _as_cuda(config: dict) -> dict:
    assert config["device"] == "cpu"
    return {**config, "device": "cuda"}


def _cpu_only(monkeypatch) -> None:
    """Also on a GPU machine: CUDA is not there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ============================================================================ TransitionDiffusion
def test_model_saved_for_cuda_loads_on_the_cpu(tmp_path, tiny_cfg, monkeypatch, caplog):
    _cpu_only(monkeypatch)
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    model = TransitionDiffusion(4, tiny_cfg.replace(train_steps=50))
    model.fit(x)
    state = model.state_dict()
    state["config"] = _as_cuda(state["config"])
    torch.save(state, tmp_path / "cuda.pt")
    with pytest.raises(ValueError, match="CUDA is not available"):   # what the rewritten config alone would do
        TransitionDiffusion(4, SynthERConfig.from_dict(state["config"]))
    explicit = TransitionDiffusion.load(tmp_path / "cuda.pt", device="cpu")
    with caplog.at_level(logging.WARNING, logger="synther_buffer.diffusion"):
        implicit = TransitionDiffusion.load(tmp_path / "cuda.pt")
    assert "saved for cuda" in caplog.text
    for loaded in (explicit, implicit):
        assert loaded.device.type == "cpu" and loaded.config.device == "cpu"
        assert all(p.device.type == "cpu" for p in loaded.ema.parameters())
        np.testing.assert_array_equal(loaded.sample(200, seed=4), model.sample(200, seed=4))


# ============================================================================ GenerativeReplay
def _fed_buffer(tiny_cfg, n=150):
    buf = GenerativeReplay(3, 2, capacity=1000, config=small(tiny_cfg), model_terminals=False)
    buf.add(*transitions(n, seed=1))
    assert buf.stats()["retrain_count"] == 1
    return buf


def test_generative_replay_checkpoint_saved_for_cuda_resumes_on_the_cpu(tmp_path, tiny_cfg, monkeypatch):
    _cpu_only(monkeypatch)
    buf = _fed_buffer(tiny_cfg)
    buf.save(tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    state["config"] = _as_cuda(state["config"])
    state["pool"]["model"]["config"] = _as_cuda(state["pool"]["model"]["config"])
    torch.save(state, tmp_path / "ck" / "state.pt")

    auto = GenerativeReplay.load(tmp_path / "ck")            # no device given: the CPU, with a warning
    assert auto.config.device == "cpu" and auto.model.device.type == "cpu"
    back = GenerativeReplay.load(tmp_path / "ck", device="cpu")
    assert back.config.device == "cpu" and back.device.type == "cpu" and back.model.device.type == "cpu"
    assert back.pool.pool.device.type == "cpu"
    assert torch.equal(back.pool.pool, buf.pool.pool)
    np.testing.assert_array_equal(back.model.sample(50, seed=2), buf.model.sample(50, seed=2))
    # the schedule goes on, on the CPU, exactly as the original's
    for b in (buf, back):
        b.add(*transitions(50, seed=2))
    assert back.stats()["retrain_count"] == buf.stats()["retrain_count"] == 2
    assert torch.equal(back.pool.pool, buf.pool.pool)


def test_pickled_buffer_for_cuda_unpickles_on_the_cpu(tiny_cfg, monkeypatch, caplog):
    _cpu_only(monkeypatch)
    buf = _fed_buffer(tiny_cfg)
    cuda = tiny_cfg.replace(device="cuda")  # as a GPU run's buffer would hold it
    pool = buf.core.pool
    buf.core.config = pool.config = small(cuda)
    pool.model.config = pool.model.config.replace(device="cuda")
    blob = pickle.dumps(buf)
    with caplog.at_level(logging.WARNING, logger="synther_buffer.diffusion"):
        back = pickle.loads(blob)
    assert "CUDA is not available" in caplog.text
    assert back.config.device == back.pool.config.device == back.model.config.device == "cpu"
    assert back.device.type == "cpu" and torch.equal(back.pool.pool, buf.pool.pool)
    back.add(*transitions(50, seed=2))
    assert back.stats()["retrain_count"] == 2


def test_to_device_moves_model_and_pool_or_changes_nothing(tiny_cfg, monkeypatch):
    _cpu_only(monkeypatch)
    buf = _fed_buffer(tiny_cfg)
    model, pool = buf.model, buf.pool.pool
    with pytest.raises(ValueError, match="CUDA is not available"):
        buf.core.to_device("cuda")
    assert buf.config.device == "cpu" and buf.model is model and buf.pool.pool is pool   # untouched
    buf.core.to_device("cpu")
    assert buf.config.device == buf.pool.config.device == "cpu" and buf.model is model


# ============================================================================ SB3 run checkpoint
@pytest.mark.timeout(900)
@pytest.mark.parametrize("saved_device", ["cuda", "auto"])
def test_sb3_run_checkpoint_saved_for_cuda_resumes_with_device_cpu(tmp_path, monkeypatch, capsys, saved_device):
    """``integrations/sb3_sac.py --resume --device cpu`` on a checkpoint whose buffer (and flags) say cuda, or
    auto (which is CUDA on a GPU machine): the diffusion model and pool move to the CPU and stay there."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl

    spec = importlib.util.spec_from_file_location("integration_sb3_sac", ROOT / "integrations" / "sb3_sac.py")
    sb3_sac = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb3_sac)
    out = tmp_path / "run"
    flags = ["--env", "Pendulum-v1", "--eval-every", "100", "--preset", "tiny", "--train-steps", "100",
             "--hidden", "32", "--utd", "1", "--learning-starts", "100", "--eval-episodes", "1", "--threads", "1",
             "--quiet", "--retrain-every", "100", "--checkpoint-every", "100", "--out", str(out)]
    from synther_buffer.sb3_run import MonitorCallback

    step = MonitorCallback._on_step

    def interrupted_after_200(cb):   # Ctrl-C after the checkpoint at env step 200
        if cb.num_timesteps > 200:
            raise KeyboardInterrupt
        return step(cb)

    with monkeypatch.context() as m:
        m.setattr(MonitorCallback, "_on_step", interrupted_after_200)
        assert sb3_sac.main([*flags, "--total-steps", "300", "--device", "cpu"]) == 130

    # rewrite the checkpoint as a CUDA run would have written it (one without --quiet: progress bars on)
    ck = out / "checkpoint"
    buf = load_from_pkl(ck / "replay_buffer.pkl")
    pool = buf.core.pool
    assert pool.config.device == "cpu" and pool.retrain_count == 2 and json.loads(
        (ck / "run.json").read_text())["env_steps"] == 200
    buf.core.config = pool.config = pool.config.replace(device=saved_device, progress=True)
    pool.model.config = pool.model.config.replace(device=saved_device, progress=True)
    buf.device = torch.device("cuda")
    save_to_pkl(ck / "replay_buffer.pkl", buf)
    run = json.loads((ck / "run.json").read_text())
    run["extra"]["args"]["device"] = saved_device
    (ck / "run.json").write_text(json.dumps(run))

    _cpu_only(monkeypatch)
    assert sb3_sac.main([*flags, "--total-steps", "300", "--device", "cpu", "--resume"]) == 0
    assert "resumed at env step 200" in capsys.readouterr().out
    d = json.loads((out / "results.json").read_text())
    assert [e["env_step"] for e in d["retrains"]] == [100, 200, 300]   # the schedule went on, on the CPU
    resumed = load_from_pkl(ck / "replay_buffer.pkl")                  # the final checkpoint
    assert resumed.config.device == resumed.core.pool.config.device == resumed.model.config.device == "cpu"
    # --quiet, which a resumed run may change, reached the buffer and its model
    assert resumed.config.progress is resumed.core.pool.config.progress is resumed.model.config.progress is False
    assert resumed.stats()["retrain_count"] == 3 and resumed.stats()["env_steps"] == 300
