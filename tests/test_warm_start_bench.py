"""benchmarks/warm_start.py (issue 18's online sequence) at a tiny size: cells, ratios, files, table."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

pytest.importorskip("mujoco")
import benchmarks.warm_start as W  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tiny_online_sequence_scores_cold_and_warm_chains(tmp_path, capsys):
    argv = ["--preset", "tiny", "--train-steps", "150", "--sizes", "300,450,600", "--warm-steps", "20,40",
            "--num-synthetic", "150", "--policy-mix", "1,1,0", "--device", "cpu", "--out", str(tmp_path)]
    assert W.main(argv) == 0
    result = json.loads((tmp_path / "warm_start.json").read_text())
    cells = {(c["retrain"], c["arm"]): c for c in result["cells"]}
    assert set(cells) == {(0, "cold"), (1, "cold"), (2, "cold"), (1, "warm 20"), (2, "warm 20"),
                          (1, "warm 40"), (2, "warm 40")}            # retrain 0 is cold for every chain
    for i in (1, 2):
        cold = cells[(i, "cold")]
        assert cold["steps"] == 150 and not cold["warm"] and cold["rows"] == (300, 450, 600)[i]
        for k in (20, 40):
            warm = cells[(i, f"warm {k}")]
            assert warm["warm"] and warm["steps"] == k
            assert warm["first_loss"] < cold["first_loss"]          # it continued a trained model
            assert warm["speedup"] == pytest.approx(cold["fit_s"] / warm["fit_s"])
            assert warm["dyn_ratio"] == pytest.approx(warm["dynamics_mse"] / cold["dynamics_mse"])
    for c in result["cells"]:
        assert c["n_scored"] == 150 and c["dynamics_mse"] > 0 and c["dynamics_mse_se"] > 0
    assert [s["arm"] for s in result["summary"]] == ["warm 20", "warm 40"]
    assert all(s["retrains"] == s["warm_fits"] == 2 for s in result["summary"])
    with open(tmp_path / "warm_start.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    out = capsys.readouterr().out
    assert "| retrain (real rows) | cold | warm 20 | warm 40 |" in out and "| 2 (600) |" in out
    assert "(= cold: first retrain)" in out and "min (median) speedup" in out
    assert all(s["min_speedup"] <= s["median_speedup"] for s in result["summary"])


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--sizes"):
        W.main(["--sizes", "600,300", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--warm-steps"):
        W.main(["--warm-steps", "0", "--out", str(tmp_path)])


def test_reuse_cold_and_the_default_warm_steps(tmp_path, monkeypatch):
    """A second sweep takes retrains 1.. cold cells from the first run (only retrain 0 is refitted) and
    sweeps the config's own rule ('default'); another setting refuses the reuse."""
    base = ["--preset", "tiny", "--train-steps", "120", "--sizes", "300,600", "--num-synthetic", "100",
            "--policy-mix", "1,1,0", "--device", "cpu"]
    first = tmp_path / "first"
    assert W.main(base + ["--warm-steps", "20", "--out", str(first)]) == 0
    fits = []
    import synther_buffer.diffusion as D
    orig = D.TransitionDiffusion.fit

    def counting_fit(self, x, **kw):
        fits.append((len(x), kw.get("warm_start")))
        return orig(self, x, **kw)
    monkeypatch.setattr(D.TransitionDiffusion, "fit", counting_fit)
    second = tmp_path / "second"
    assert W.main(base + ["--warm-steps", "default", "--reuse-cold", str(first / "warm_start.json"),
                          "--out", str(second)]) == 0
    assert fits == [(300, False), (600, True)]                      # retrain 1's cold fit was not redone
    old = {(c["retrain"], c["arm"]): c for c in json.loads((first / "warm_start.json").read_text())["cells"]}
    new = {(c["retrain"], c["arm"]): c for c in json.loads((second / "warm_start.json").read_text())["cells"]}
    assert new[(1, "cold")]["dynamics_mse"] == old[(1, "cold")]["dynamics_mse"]
    assert new[(0, "cold")]["dynamics_mse"] == old[(0, "cold")]["dynamics_mse"]   # deterministic refit
    assert new[(1, "warm default")]["steps"] == 120 // 4 and new[(1, "warm default")]["warm"]
    with pytest.raises(ValueError, match="sizes"):
        W.main(base[:5] + ["300,450"] + base[6:] + ["--warm-steps", "default", "--reuse-cold",
                                                    str(first / "warm_start.json"), "--out", str(tmp_path / "x")])
