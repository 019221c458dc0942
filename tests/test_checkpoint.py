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
        (d / "a.txt").write_text("two")
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt"] and not path.with_name("ckpt.old").exists()
    assert (path / "a.txt").read_text() == "two"
    # a kill between the swap's two renames leaves only ckpt.old: it is found
    path.rename(path.with_name("ckpt.old"))
    assert resolve_directory(path) == path.with_name("ckpt.old")
    assert resolve_directory(tmp_path / "missing") is None


def test_atomic_directory_never_deletes_files_it_did_not_write(tmp_path):
    """Saving into a user's run directory must not swap it out with their files in it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="results.csv"):
        with atomic_directory(run) as d:
            (d / "state.pt").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == ["results.csv"]      # untouched
    assert not run.with_name("run.tmp").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as d:                                  # an empty directory is fine
        (d / "state.pt").write_text("new")
    assert (empty / "state.pt").read_text() == "new"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "afile") as d:
            pass
    assert (tmp_path / "afile").read_text() == "x"


def test_buffer_save_refuses_a_directory_with_other_files(tmp_path):
    from synther_buffer import GenerativeReplay, SynthERConfig

    buf = GenerativeReplay(3, 2, capacity=10, config=SynthERConfig.preset("tiny"))
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        buf.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    buf.save(tmp_path / "buf")
    buf.save(tmp_path / "buf")                                          # a second save replaces the first
    assert GenerativeReplay.load(tmp_path / "buf").obs_dim == 3


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


def test_run_checkpoint_keeps_non_finite_monitor_values(tmp_path):
    """A diverged run (NaN return, inf temperature) checkpoints and resumes with the values it had."""
    class Diverged:
        def state_dict(self):
            return {"evals": [{"env_step": 100, "mean_return": float("nan"), "alpha": float("inf")}]}

    ckpt = RunCheckpoint(tmp_path / "checkpoint", every=100)
    ckpt.save(100, Diverged(), lambda d: None)
    row = ckpt.load()[1]["monitor"]["evals"][0]
    assert np.isnan(row["mean_return"]) and row["alpha"] == float("inf")


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
