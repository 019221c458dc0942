"""Fidelity vs data size (benchmarks/fidelity/sizes.py): variant parsing, resumable cells, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

import benchmarks.fidelity.sizes as S  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_parse_variant():
    v = S.parse_variant("steps45k@50000,100000:train_steps=45000,width=512")
    assert v.name == "steps45k" and v.overrides == {"train_steps": 45000, "width": 512}
    assert v.applies_to(50000) and v.applies_to(100000) and not v.applies_to(10000)
    assert S.parse_variant("b:batch_size=None").overrides == {"batch_size": None}
    assert S.parse_variant("all:lr=0.001").applies_to(7)


@pytest.mark.parametrize("spec", ["nocolon", "x:", ":train_steps=5", "x:nosuchfield=1", "x:train_steps"])
def test_parse_variant_rejects(spec):
    with pytest.raises(ValueError):
        S.parse_variant(spec)


def test_invalid_variant_values_stop_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="train_steps"):
        S.main(["--variant", "x:train_steps=-3", "--out", str(tmp_path)])
    # values are checked against the chosen preset, not the dataclass defaults
    with pytest.raises(SystemExit, match="max_train_steps"):
        S.main(["--preset", "fast", "--variant", "x:max_train_steps=5000", "--out", str(tmp_path)])
    assert not (tmp_path / "cells").exists()


def test_epochs_seen():
    assert S.epochs_seen(15_000, 256, 10_000) == pytest.approx(384.0)
    assert S.epochs_seen(15_000, 256, 50_000) == pytest.approx(76.8)


def test_cells_resume_and_report(tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    out = tmp_path / "sizes"
    argv = ["--sizes", "200", "400", "--preset", "tiny", "--variant", "short@400:train_steps=50",
            "--num-synthetic", "100", "--policy-mix", "1,1,0", "--out", str(out)]
    assert S.main(argv) == 0
    cells = sorted(p.relative_to(out / "cells").as_posix() for p in (out / "cells").glob("*/*/*.json"))
    assert cells == ["HalfCheetah-v5/additive/200.json", "HalfCheetah-v5/additive/400.json",
                     "HalfCheetah-v5/preset/200.json", "HalfCheetah-v5/preset/400.json",
                     "HalfCheetah-v5/real/200.json", "HalfCheetah-v5/real/400.json",
                     "HalfCheetah-v5/short/400.json"]
    short = json.loads((out / "cells/HalfCheetah-v5/short/400.json").read_text())
    assert short["train_steps"] == 50 and short["epochs"] == pytest.approx(50 * 256 / 400)
    preset = json.loads((out / "cells/HalfCheetah-v5/preset/200.json").read_text())
    assert preset["dynamics_mse"] > 0 and preset["n_scored"] == 100
    real = json.loads((out / "cells/HalfCheetah-v5/real/200.json").read_text())
    assert real["dynamics_mse"] < 1e-6      # held-out real rows replay exactly

    # a second run fits nothing: every cell is found with the same settings
    def no_fit(*a, **k):
        raise AssertionError("a stored cell was re-measured")
    monkeypatch.setattr("synther_buffer.offline.make_model", no_fit)
    assert S.main(argv) == 0
    # ... but a changed setting is a new cell
    with pytest.raises(AssertionError, match="re-measured"):
        S.main([a.replace("train_steps=50", "train_steps=60") for a in argv])

    rows = json.loads((out / "sizes.json").read_text())["rows"]
    by = {(r["size"], r["variant"]): r for r in rows}
    assert by[(200, "additive")]["dyn_x_additive"] == pytest.approx(1.0)
    assert by[(400, "short")]["dyn_x_additive"] == pytest.approx(
        short["dynamics_mse"] / by[(400, "additive")]["dynamics_mse"])
    assert (out / "sizes.csv").read_text().splitlines()[0].startswith("env,size,variant")


def test_collected_data_is_cached_per_policy_mix(tmp_path, monkeypatch):
    """Another --policy-mix (or reference size) is other data: a new collection, never the cached one."""
    import numpy as np

    import benchmarks.fidelity.oracles as oracles

    calls = []

    def fake_collect(env, n, seed, policy_probs):
        calls.append(tuple(policy_probs))
        return {k: np.full((n, 2), float(sum(policy_probs) * 10 + seed), np.float32) for k in oracles.KEYS}

    monkeypatch.setattr(oracles, "collect_transitions", fake_collect)
    a = S.load_or_collect("HalfCheetah-v5", 5, 3, 0, tmp_path, (1.0, 0.0, 0.0))
    b = S.load_or_collect("HalfCheetah-v5", 5, 3, 0, tmp_path, (1.0, 1.0, 0.0))
    assert not np.array_equal(a["train"]["actions"], b["train"]["actions"])
    again = S.load_or_collect("HalfCheetah-v5", 5, 3, 0, tmp_path, (1.0, 0.0, 0.0))
    assert np.array_equal(again["train"]["actions"], a["train"]["actions"]) and len(calls) == 6   # cached
    S.load_or_collect("HalfCheetah-v5", 5, 4, 0, tmp_path, (1.0, 0.0, 0.0))
    assert len(calls) == 9 and len(list(tmp_path.glob("data_*.npz"))) == 3
