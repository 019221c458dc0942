"""Smoke test of ``python -m benchmarks.throughput --quick`` (seconds, tiny sizes, CPU).

The peer (lucidrains ``denoising-diffusion-pytorch``) is a benchmark-only extra: its checks are
skipped when it is not installed; ours and the replay-buffer latency comparison always run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil

import pytest
import torch

from benchmarks import throughput as tp

HAVE_PEER = importlib.util.find_spec("denoising_diffusion_pytorch") is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    threads = torch.get_num_threads()
    try:
        res = tp.main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    return res, out


def _positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_files_and_keys(quick):
    res, out = quick
    for name in ("throughput.json", "throughput.csv", "throughput.md"):
        assert (out / name).is_file(), name
    data = json.loads((out / "throughput.json").read_text())
    assert {"meta", "peak_gflops", "peak_samples", "train", "sample", "buffer", "targets"} <= set(data)
    assert data["meta"]["threads"] == 1 and data["meta"]["device"] == "cpu" and data["meta"]["quick"]
    assert _positive(data["peak_gflops"])
    with open(out / "throughput.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(tp.CSV_FIELDS) == set(rows[0])
    assert {r["kind"] for r in rows} == {"train", "sample", "buffer"}
    md = (out / "throughput.md").read_text()
    assert "| train steps/s |" in md and "ours/peer" in md and "GenerativeReplayBuffer" in md


def test_ours_rates(quick):
    res, _ = quick
    assert res["train"] and res["sample"]
    for r in res["train"]:
        assert r["unit"] == "steps/s" and r["k2"] > r["k1"] >= 1
        assert _positive(r["ours_rate"]) and _positive(r["ours_peak_frac"])
        if r["precision"] == "bf16":  # fp32 floors are no ceiling for bf16 matmuls
            assert r["floor_gflops"] is None and r["floor_peak_frac"] is None
            continue
        assert r["flops_per_step"] > 0 and _positive(r["floor_gflops"]) and _positive(r["floor_peak_frac"])
        assert _positive(r["floor_adam_gflops"]) and _positive(r["floor_adam_peak_frac"])
    samplers = {(r["sampler"], r["sample_steps"]) for r in res["sample"]}
    assert {s for s, _ in samplers} == {"stochastic", "deterministic"}
    for r in res["sample"]:
        assert r["unit"] == "samples/s" and r["rows"] > 0
        assert _positive(r["ours_rate"])


def test_buffer_latency(quick):
    b = quick[0]["buffer"]
    assert b["batch"] == 256 and b["num_synthetic"] > 0 and b["num_real"] > 0
    assert _positive(b["ours_us"]) and _positive(b["plain_us"]) and _positive(b["ratio"])


def test_memory_probe(quick):
    """The pool is stored once as float32 and sampling allocates no pool-sized copies."""
    m = quick[0]["memory"]
    assert m["pool_rows"] == 20_000 and m["dim"] == 41 and m["dtype"] == "float32"
    assert m["pool_mb"] == pytest.approx(20_000 * 41 * 4 / 2 ** 20)
    assert m["rss_after_retrain_mb"] >= m["rss_before_mb"] and m["peak_during_retrain_mb"] >= m["rss_after_retrain_mb"]
    assert m["peak_during_sampling_mb"] - m["rss_after_retrain_mb"] < m["pool_mb"]   # no copy of the pool
    assert "peak RSS during the retrain" in (quick[1] / "throughput.md").read_text()


@pytest.mark.skipif(not HAVE_PEER, reason="bench extra denoising-diffusion-pytorch not installed")
def test_peer_rates(quick):
    res, _ = quick
    assert res["meta"]["peer"].startswith("denoising-diffusion-pytorch")
    for r in res["train"] + res["sample"]:
        assert _positive(r["peer_rate"]), r
        assert _positive(r["ratio"]) and _positive(r["peer_peak_frac"])
    assert any(t["target"].startswith("sample") for t in res["targets"])


@pytest.mark.skipif(not HAVE_PEER, reason="bench extra denoising-diffusion-pytorch not installed")
def test_peer_runs_our_network_unchanged():
    """The peer wraps OUR denoiser: same parameters, same output on the same rows."""
    peer = tp.load_peer()
    cfg = tp.model_cfg(32, 2, torch.device("cpu"), quick=True)
    diffusion = tp.build_peer(peer, cfg, torch.device("cpu"), seed=3)
    ours = diffusion.net.net
    assert isinstance(ours, tp.ResidualMLPDenoiser)
    assert sum(p.numel() for p in diffusion.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t = torch.randn(5, tp.DIM), torch.randn(5)
    torch.testing.assert_close(diffusion.net(x.reshape(5, tp.DIM, 1, 1), t).reshape(5, tp.DIM), ours(x, t))
    out = tp.peer_sample(diffusion, 4, 2)
    assert out.shape == (4, tp.DIM, 1, 1) and torch.isfinite(out).all()


def test_no_peer_flag(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = tp.main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(tmp_path), "--quiet",
                       "--no-peer", "--no-buffer"])
    finally:
        torch.set_num_threads(threads)
    assert res["meta"]["peer"] is None and res["buffer"] is None
    assert all(r["peer_rate"] is None and r["ratio"] is None for r in res["train"] + res["sample"])
    assert "| - |" in (tmp_path / "throughput.md").read_text()


def test_flop_count_matches_linear_weights():
    net = tp.ResidualMLPDenoiser(tp.DIM, width=64, depth=2, rff_dim=16, time_dim=32)
    weights = (tp.DIM * 32) + (17 * 32) + (32 * 32) + (32 * 64) + 2 * (64 * 64) + (64 * tp.DIM)
    assert tp.linear_flops_per_row(net) == 2 * weights


def test_matmul_floor_counts_the_step_flops(monkeypatch):
    """The floor runs 3 matmuls per Linear per step (forward, weight grad, input grad) and divides the
    step's FLOPs (3 x 2 x weights x batch) by the time taken."""
    net = tp.ResidualMLPDenoiser(tp.DIM, width=32, depth=2, rff_dim=16, time_dim=16)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    calls = []
    real_mm, real_addmm = torch.mm, torch.addmm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append("mm") or real_mm(*a, **k))
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append("addmm") or real_addmm(*a, **k))
    monkeypatch.setattr(tp, "_timed", lambda fn, device: (fn(), 0.5)[1])  # every timed run "takes" 0.5 s
    g = tp.matmul_floor_gflops(net, 8, torch.device("cpu"), steps=2, reps=3)
    assert calls.count("addmm") == 4 * 2 * n_linear and calls.count("mm") == 4 * 2 * 2 * n_linear  # warm-up + 3
    assert g == pytest.approx(2 * 3 * tp.linear_flops_per_row(net) * 8 / 0.5 / 1e9)


def test_matmul_floor_with_adam_takes_one_optimizer_step_per_step(monkeypatch):
    """with_adam adds fit's clipped Adam step (over as many parameters as the net has) per step, and
    counts the same FLOPs."""
    net = tp.ResidualMLPDenoiser(tp.DIM, width=32, depth=2, rff_dim=16, time_dim=16)
    n_params = sum(p.numel() for p in net.parameters())
    steps = []
    real_step = tp.clipped_adam_step

    def counting(opt, params, max_norm):
        assert max_norm == 1.0 and len(params) == 1 and params[0].numel() == n_params
        steps.append(params[0].detach().clone())
        real_step(opt, params, max_norm)

    monkeypatch.setattr(tp, "clipped_adam_step", counting)
    monkeypatch.setattr(tp, "_timed", lambda fn, device: (fn(), 0.5)[1])
    g = tp.matmul_floor_gflops(net, 8, torch.device("cpu"), steps=2, reps=3, with_adam=True)
    assert len(steps) == 4 * 2                                    # warm-up + 3 timed runs, 2 steps each
    assert not torch.equal(steps[0], steps[-1])                   # the optimizer really moves the tensor
    assert g == pytest.approx(2 * 3 * tp.linear_flops_per_row(net) * 8 / 0.5 / 1e9)


def _rate_plan() -> dict:
    """The quick plan with longer and repeated timed runs: a rate is the step difference over the time
    difference of two fits, and one pair of 0.05 s fits can time out of order on a loaded machine (NaN)."""
    return dict(tp.plan(True, torch.device("cpu")), target_s=0.2, repeats=3)


def test_autograd_context_row(torch_one_thread):
    """The "ours: autograd" row runs our loop without the hand-written gradients (chosen through the
    config, no module switch), and is left out of the targets."""
    p = _rate_plan()
    x = torch.randn(p["rows"], tp.DIM).numpy()
    peaks = [tp.matmul_peak_gflops(torch.device("cpu"), p["peak_n"], reps=1)]
    r = tp.bench_train(None, 64, 2, 64, x, None, p, torch.device("cpu"), True, peaks, "index", gradients="autograd")
    assert r["gradients"] == "autograd" and _positive(r["ours_rate"])
    assert tp.bench_train(None, 64, 2, 64, x, None, p, torch.device("cpu"), True, peaks, "index")["gradients"] == "manual"
    fake = dict(r, width=256, depth=4, batch=256, ratio=0.9, ours_peak_frac=0.5)
    assert tp.check_targets({"train": [fake], "sample": []}) == []
    with pytest.raises(ValueError, match="gradients"):
        tp.bench_train(None, 64, 2, 64, x, None, p, torch.device("cpu"), True, peaks, "index", gradients="bogus")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_training_row(torch_one_thread):
    """The "ours: torch.compile" row trains through the compiled loss and reports a rate and a target."""
    p = _rate_plan()
    x = torch.randn(p["rows"], tp.DIM).numpy()
    peaks = [tp.matmul_peak_gflops(torch.device("cpu"), p["peak_n"], reps=1)]
    r = tp.bench_train(None, 64, 2, 64, x, None, p, torch.device("cpu"), True, peaks, "index", compile=True)
    assert r["compile"] is True and _positive(r["ours_rate"]) and r["peer_rate"] is None
    fake = dict(r, width=256, depth=4, batch=256, ratio=1.31, ours_peak_frac=0.5)
    (t,) = tp.check_targets({"train": [fake], "sample": []})
    assert t["target"] == "train w256/d4/b256 (ours: torch.compile) >= 1.3x peer" and t["met"]


def test_bf16_rows(torch_one_thread, quick):
    """precision="bf16" rows: ours trains and samples with SynthERConfig.precision="bf16" (the peer, when
    installed, under autocast), "% peak" is of the bf16 peak, and they are left out of the fp32
    targets. In the quick run they appear exactly when the CPU has native bf16 matmuls."""
    res, out = quick
    native = tp.bf16_is_native(torch.device("cpu"))
    bf_rows = [r for r in res["train"] + res["sample"] if r["precision"] == "bf16"]
    assert bool(bf_rows) == native and (res["peak_bf16_gflops"] is not None) == native
    if native:
        assert {r["kind"] for r in bf_rows} == {"train", "sample"}
        assert "(both bf16)" in (out / "throughput.md").read_text()
    p = _rate_plan()
    x = torch.randn(p["rows"], tp.DIM).numpy()
    peaks = [tp.matmul_peak_gflops(torch.device("cpu"), p["peak_n"], reps=1)]
    r = tp.bench_train(None, 64, 2, 64, x, None, p, torch.device("cpu"), True, peaks, "index", precision="bf16")
    assert r["precision"] == "bf16" and _positive(r["ours_rate"]) and r["floor_gflops"] is None
    assert len(peaks) == 1                                        # the fp32 peak is not sampled in a bf16 row
    s = tp.bench_sample(None, 64, 2, "stochastic", 4, x, None, p, torch.device("cpu"), True, peaks[0], "index",
                        precision="bf16")
    assert s["precision"] == "bf16" and _positive(s["ours_rate"])
    fake_train = dict(r, width=256, depth=4, batch=256, ratio=2.0, ours_peak_frac=0.5)
    fake_sample = dict(s, ratio=0.5)
    assert tp.check_targets({"train": [fake_train], "sample": [fake_sample]}) == []
    assert tp.matmul_peak_gflops(torch.device("cpu"), 64, reps=1, dtype=torch.bfloat16) > 0
