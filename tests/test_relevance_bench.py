"""The benchmark switches of relevance-guided generation: fidelity ``--relevance`` and utd20's ``pgr_utd20`` arm."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.fidelity import cli as F


def test_fidelity_relevance_curiosity_rows(tmp_path):
    out = tmp_path / "fid"
    rc = F.main(["--env", "HalfCheetah-v5", "--preset", "tiny", "--train-steps", "200", "--num-real", "400",
                 "--num-synthetic", "200", "--out", str(out), "--generators", "real,synther", "--no-sdmetrics",
                 "--policy-mix", "1,1,0", "--device", "cpu", "--relevance", "curiosity", "--relevance-steps", "50"])
    assert rc == 0
    res = json.loads((out / "fidelity.json").read_text())
    labels = [r["generator"] for r in res["table"]]
    assert labels[1].startswith("SynthER (") and labels[2:] == ["SynthER PGR curiosity w=0 (unguided)",
                                                                 "SynthER PGR curiosity w=2 (guided)"]
    assert all(np.isfinite(r["dynamics_mse"]) for r in res["table"])
    means = res["details"]["relevance"]["mean_relevance"]
    assert set(means) == {"real (train)", "real (held out)", "SynthER", *labels[2:]}
    assert all(np.isfinite(v) for v in means.values())
    assert all("relevance_mean" in r for r in res["table"][1:])
    assert "relevance_mean" in (out / "fidelity.csv").read_text().splitlines()[0]


def test_utd20_pgr_arm_is_opt_in():
    from benchmarks import utd20

    p = utd20.PRESETS["cpu"]
    a = {arm: utd20.unit_args(p, utd20.Unit("cheetah-run", arm, 0)) for arm in ("synther_utd20", "pgr_utd20")}
    assert a["pgr_utd20"] == a["synther_utd20"] + ["--relevance", "curiosity"]
    assert all("pgr_utd20" not in utd20.PRESETS[name].arms for name in ("paper", "cpu"))
    assert "pgr_utd20" in utd20.PRESETS["smoke"].arms


def test_utd20_units_recorded_before_new_config_fields_still_match():
    from benchmarks import utd20

    p = utd20.PRESETS["cpu"]
    current = utd20.unit_settings(p, utd20.Unit("cheetah-run", "synther_utd20", 0))
    old = {**current, "synther_config": {k: v for k, v in current["synther_config"].items()
                                         if k not in ("relevance", "guidance_scale", "cond_dropout")}}
    assert utd20.settings_match(old, current)
    changed = {**current, "synther_config": {**current["synther_config"], "relevance": "curiosity"}}
    assert not utd20.settings_match(old, changed) and not utd20.settings_match(current, changed)
