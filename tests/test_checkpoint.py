"""synther_buffer.checkpoint: atomic directories, RNG round trips, RunCheckpoint schedule and errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from synther_buffer.checkpoint import (RunCheckpoint, atomic_directory, check_resume_settings, resolve_directory,
                                       rng_state, set_rng_state)


class _Monitor:
    def __init__(self, steps):
        self.steps = steps

    def state_dict(self):
        return {"env_steps": self.steps}


def test_atomic_directory_swaps_whole_or_keeps_old(tmp_path):
    path = tmp_path / "ckpt"
    with atomic_directory(path) as d:
        (d / "a.txt").write_text("one")
    assert (path / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_directory(path) as d:
            (d / "a.txt").write_text("half-written")
            raise RuntimeError("killed mid-write")
    assert (path / "a.txt").read_text() == "one"                      # the old one is intact
    assert not path.with_name("ckpt.tmp").exists()
    with atomic_directory(path) as d:
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in path.iterdir()) == ["b.txt"] and not path.with_name("ckpt.old").exists()
    # a kill between the swap's two renames leaves only ckpt.old: it is found
    path.rename(path.with_name("ckpt.old"))
    assert resolve_directory(path) == path.with_name("ckpt.old")
    assert resolve_directory(tmp_path / "missing") is None


def test_rng_state_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_run_checkpoint_schedule_save_load(tmp_path):
    ckpt = RunCheckpoint(tmp_path / "out" / "checkpoint", every=100)
    assert ckpt.load() is None
    assert [s for s in range(1, 250) if ckpt.due(s)][:2] == [100, 101]    # due until saved
    ckpt.save(100, _Monitor(100), lambda d: (d / "agent.bin").write_bytes(b"x"), extra={"a": 1})
    assert not ckpt.due(199) and ckpt.due(200) and ckpt.due(350)
    d, run = RunCheckpoint(tmp_path / "out" / "checkpoint").load()
    assert (d / "agent.bin").read_bytes() == b"x"
    assert run["env_steps"] == 100 and run["monitor"] == {"env_steps": 100} and run["extra"] == {"a": 1}
    # a failing agent writer leaves the previous checkpoint
    with pytest.raises(OSError):
        ckpt.save(200, _Monitor(200), lambda d: (_ for _ in ()).throw(OSError("disk full")))
    assert RunCheckpoint(tmp_path / "out" / "checkpoint").load()[1]["env_steps"] == 100
    assert not RunCheckpoint(tmp_path / "x", every=0).due(10 ** 6)


def test_run_checkpoint_rejects_bad_input(tmp_path):
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="every"):
            RunCheckpoint(tmp_path, every=bad)
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        RunCheckpoint(d).load()
    (d / "run.json").write_text(json.dumps({"version": 99, "env_steps": 1}))
    with pytest.raises(ValueError, match="version"):
        RunCheckpoint(d).load()


def test_check_resume_settings_names_each_difference():
    saved = {"env": "cheetah-run", "seed": 0, "total_steps": 100, "out": "a"}
    check_resume_settings(saved, {**saved, "total_steps": 50, "out": "b"}, may_change={"total_steps", "out"})
    check_resume_settings(saved, {**saved, "new_flag": 1})          # flags the checkpoint predates are allowed
    with pytest.raises(ValueError, match=r"--env 'cheetah-run' \(now 'walker-walk'\), --seed 0 \(now 1\)"):
        check_resume_settings(saved, {**saved, "env": "walker-walk", "seed": 1})


# ---------------------------------------------------------------------------- weights-only directories
def test_weights_only_directory_round_trip_and_refusals(tmp_path):
    import argparse

    from synther_buffer.checkpoint import read_weights_only, write_weights_only

    write_weights_only(tmp_path / "d", {"a.pt": {"x": torch.arange(3), "n": 2}, "b.pt": [1.5, "s"]})
    d, files = read_weights_only(tmp_path / "d", ("a.pt", "b.pt"), "test checkpoint")
    assert d == tmp_path / "d" and torch.equal(files["a.pt"]["x"], torch.arange(3)) and files["b.pt"] == [1.5, "s"]
    torch.save(argparse.Namespace(a=1), tmp_path / "d" / "b.pt")   # an object the safe loader does not allow
    with pytest.raises(ValueError, match=r"test checkpoint .*b\.pt"):
        read_weights_only(tmp_path / "d", ("a.pt", "b.pt"), "test checkpoint")
    with pytest.raises(FileNotFoundError):
        read_weights_only(tmp_path / "d", ("c.pt",), "test checkpoint")
    with pytest.raises(FileNotFoundError):
        read_weights_only(tmp_path / "none", ("a.pt",), "test checkpoint")
