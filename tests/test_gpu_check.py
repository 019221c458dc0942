"""benchmarks.gpu_check: the CPU-sized subset runs and writes its JSON; goals are judged on CUDA only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_json_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA device here" in r.stdout
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not res["cuda"] and res["quick"] and gpu_check.failed_sections(res) == []
    assert res["fit_fp32"]["steps_per_s"] > 0 and res["sample_fp32"]["rows_per_s"] > 0
    assert res["train_smoke"]["ok"] and res["train_smoke"]["retrains"] >= 1
    assert res["cuda_tests"]["ok"]
    assert all(g["met"] is None and g["seconds"] is None for g in res["goals"])   # not judged off a GPU
    assert "| goal (H100-class GPU) |" in (tmp_path / "gpu_check.md").read_text()


def test_goals_are_judged_on_a_full_cuda_run():
    res = {"cuda": True, "quick": False, "fit_fp32": {"seconds_100k": 90.0}, "fit_bf16": {"seconds_100k": 150.0},
           "sample_fp32": {"seconds_1m": 29.0}}
    got = {g["goal"]: g["met"] for g in gpu_check.goals(res)}
    assert got == {"100K training steps (fp32)": True, "100K training steps (bf16)": False,
                   "1M samples, 128 steps (fp32)": True, "1M samples, 128 steps (bf16)": False}
    assert gpu_check.failed_sections({"a": {"error": "x"}, "b": {"ok": False}, "c": {"ok": True}}) == ["a", "b"]
