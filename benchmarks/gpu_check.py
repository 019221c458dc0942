"""One command to see the GPU path work and how fast it is.

    python -m benchmarks.gpu_check                      # on a CUDA machine: the full check (< 8 min)
    python -m benchmarks.gpu_check --device cpu --quick # CPU-sized subset (what CI runs)

Sections, each run even if another fails (its error is recorded):

1. ``cuda_tests``: the test suite's CUDA-marked tests (``pytest -m cuda``); they skip without CUDA.
2. ``fit``: the ``paper`` preset's training step (1024 x 6, batch 256), timed over K1 and K2 steps so
   setup cancels ((K2 - K1) / (t2 - t1)), in fp32 and bf16, extrapolated to 100K steps.
3. ``sample``: rows/s of the paper's 128-step stochastic sampler on a subset, extrapolated to 1M rows.
4. ``compile``: the fp32 fit with ``SynthERConfig.compile=True`` (compilation in an untimed warm-up).
5. ``peer``: ours vs the lucidrains ``ElucidatedDiffusion`` peer at width 1024 (``benchmarks.throughput``),
   when the peer is installed.
6. ``memory``: peak GPU memory over the run (CUDA only).
7. ``train_smoke``: a short ``synther train`` on the device (tiny preset, Pendulum-v1).

Goals it reports against, for an H100-class GPU: 100K training steps < 2 min, 1M samples < 30 s.
Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` and prints the table. Without CUDA it
says so and exits 0 after running its subset; with CUDA it exits 1 if a section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.diffusion import bf16_is_native, resolve_device

REPO = Path(__file__).resolve().parents[1]
GOAL_FIT_100K_S = 120.0      # 100K training steps in under 2 minutes
GOAL_SAMPLE_1M_S = 30.0      # 1M samples (128-step sampler) in under 30 seconds
DIM = 41                     # a DMC cheetah-run transition: 17 + 6 + 1 + 17


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def sizes(device: torch.device, quick: bool) -> Dict[str, Any]:
    """What each section runs: the paper network and enough work to time on a GPU; small on ``quick``."""
    if quick:
        return {"width": 256, "depth": 2, "rows": 2_000, "k1": 5, "k2": 25, "sample_rows": 256, "sample_steps": 8}
    big = device.type == "cuda"
    return {"width": 1024, "depth": 6, "rows": 100_000 if big else 10_000, "k1": 200 if big else 10,
            "k2": 1_200 if big else 40, "sample_rows": 100_000 if big else 512,
            "sample_steps": 128}


def _config(s: Dict[str, Any], device: torch.device, **changes) -> SynthERConfig:
    return SynthERConfig.preset("paper").replace(width=s["width"], depth=s["depth"], device=str(device),
                                                 progress=False, **changes)


def section_fit(s: Dict[str, Any], device: torch.device, x: np.ndarray, precision: str,
                compile: bool = False) -> Dict[str, Any]:
    """Training steps/s of the paper step (K2 - K1 steps over their time difference), and 100K extrapolated."""
    model = TransitionDiffusion(DIM, _config(s, device, precision=precision, compile=compile))
    model.fit(x, steps=s["k1"], progress=False)          # warm-up: allocator, kernels, compilation
    t1 = _timed(lambda: model.fit(x, steps=s["k1"], progress=False), device)
    t2 = _timed(lambda: model.fit(x, steps=s["k2"], progress=False), device)
    rate = (s["k2"] - s["k1"]) / (t2 - t1) if t2 > t1 else float("nan")
    return {"precision": precision, "compile": compile, "width": s["width"], "depth": s["depth"], "batch": 256,
            "steps_per_s": rate, "seconds_100k": 100_000 / rate, "gradients": model.last_fit.get("gradients"),
            "compiled": model.last_fit.get("compiled")}


def section_sample(s: Dict[str, Any], device: torch.device, x: np.ndarray, precision: str) -> Dict[str, Any]:
    """Rows/s of the paper's stochastic sampler (``sample_steps`` steps) and 1M rows extrapolated."""
    model = TransitionDiffusion(DIM, _config(s, device, precision=precision, sample_steps=s["sample_steps"]))
    model.fit(x, steps=s["k1"], progress=False)
    n = s["sample_rows"]
    model.sample(min(n, 64), batch_size=n, progress=False)   # warm-up
    t = _timed(lambda: model.sample(n, batch_size=n, progress=False), device)
    return {"precision": precision, "sample_steps": s["sample_steps"], "rows": n, "rows_per_s": n / t,
            "seconds_1m": 1_000_000 * t / n}


def section_peer(s: Dict[str, Any], device: torch.device, x: np.ndarray) -> Dict[str, Any]:
    """Ours vs the lucidrains peer on the same network and device (benchmarks.throughput's training row)."""
    from benchmarks import throughput

    peer = throughput.load_peer()
    if peer is None:
        return {"skipped": "peer not installed: pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch"}
    p = throughput.plan(quick=device.type != "cuda", device=device)
    p["repeats"] = 1 if device.type != "cuda" else 3
    images = torch.as_tensor(x, device=device).reshape(x.shape[0], DIM, 1, 1)
    row = throughput.bench_train(peer, s["width"], s["depth"], 256, x, images, p, device,
                                 quick=device.type != "cuda", peak_samples=[], loader="index")
    return {"width": s["width"], "ours_steps_per_s": row["ours_rate"], "peer_steps_per_s": row["peer_rate"],
            "ratio": row["ours_rate"] / row["peer_rate"] if row["peer_rate"] else None}


def section_cuda_tests() -> Dict[str, Any]:
    """The suite's ``cuda``-marked tests; returns pytest's counts."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    return {"returncode": r.returncode, "summary": tail, **counts,
            "ok": r.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")}


def section_train_smoke(device: torch.device) -> Dict[str, Any]:
    """A short ``synther train`` run on ``device`` (tiny preset, Pendulum-v1, one retrain)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "synther_buffer.cli", "train", "--env", "Pendulum-v1",
                            "--preset", "tiny", "--total-steps", "300", "--utd", "2", "--retrain-every", "200",
                            "--eval-every", "300", "--eval-episodes", "1", "--device", str(device), "--quiet",
                            "--out", out], cwd=REPO, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        res = json.loads((Path(out) / "results.json").read_text()) if (Path(out) / "results.json").exists() else {}
    return {"returncode": r.returncode, "seconds": wall, "retrains": res.get("retrain_count"),
            "ok": r.returncode == 0 and bool(res), "tail": (r.stdout + r.stderr)[-400:] if r.returncode else ""}


def _guarded(name: str, fn: Callable[[], Any], results: Dict[str, Any]) -> None:
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # one broken section must not hide the others
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    if isinstance(results[name], dict):
        results[name]["section_seconds"] = round(time.perf_counter() - t0, 1)


def run(device_name: str = "auto", quick: bool = False) -> Dict[str, Any]:
    """All sections on ``device_name``; returns the results dict (what ``gpu_check.json`` holds)."""
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    s = sizes(device, quick)
    x = np.random.default_rng(0).standard_normal((s["rows"], DIM)).astype(np.float32)
    res: Dict[str, Any] = {"device": str(device), "cuda": cuda, "quick": quick, "torch": torch.__version__,
                           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                           "bf16_native": bf16_is_native(device), "sizes": s,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 here
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    _guarded("cuda_tests", section_cuda_tests, res)
    _guarded("fit_fp32", lambda: section_fit(s, device, x, "fp32"), res)
    if res["bf16_native"]:
        _guarded("fit_bf16", lambda: section_fit(s, device, x, "bf16"), res)
    _guarded("sample_fp32", lambda: section_sample(s, device, x, "fp32"), res)
    if res["bf16_native"]:
        _guarded("sample_bf16", lambda: section_sample(s, device, x, "bf16"), res)
    if not quick:
        _guarded("compile", lambda: section_fit(s, device, x, "fp32", compile=True), res)
        _guarded("peer", lambda: section_peer(s, device, x), res)
    res["memory"] = ({"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                      "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20} if cuda
                     else {"skipped": "no CUDA"})
    _guarded("train_smoke", lambda: section_train_smoke(device), res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["goals"] = goals(res)
    return res


def goals(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The H100-class goals against the measured numbers (judged only on CUDA at the paper's sizes)."""
    judged = res["cuda"] and not res["quick"]
    out = []
    for name, key, field, goal in (("100K training steps (fp32)", "fit_fp32", "seconds_100k", GOAL_FIT_100K_S),
                                   ("100K training steps (bf16)", "fit_bf16", "seconds_100k", GOAL_FIT_100K_S),
                                   ("1M samples, 128 steps (fp32)", "sample_fp32", "seconds_1m", GOAL_SAMPLE_1M_S),
                                   ("1M samples, 128 steps (bf16)", "sample_bf16", "seconds_1m", GOAL_SAMPLE_1M_S)):
        v = None if res["quick"] else res.get(key, {}).get(field)   # quick sizes are not the paper's
        out.append({"goal": name, "seconds": v, "limit_s": goal,
                    "met": (v is not None and v < goal) if judged else None})
    return out


def failed_sections(res: Dict[str, Any]) -> List[str]:
    return [k for k, v in res.items() if isinstance(v, dict) and ("error" in v or v.get("ok") is False)]


def _f(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"# gpu_check: {res['device_name']} ({res['device']}), torch {res['torch']}"
             + (" -- quick CPU subset" if res["quick"] else ""), ""]
    if not res["cuda"]:
        lines += ["No CUDA device: this ran the CPU-sized subset. The goals are for an H100-class GPU.", ""]
    lines += ["| what | result |", "| --- | --- |"]
    ct = res.get("cuda_tests", {})
    lines.append(f"| CUDA-marked tests | {ct.get('summary', ct.get('error', '-'))} |")
    for key in ("fit_fp32", "fit_bf16", "compile"):
        r = res.get(key)
        if r:
            lines.append(f"| train {key.replace('fit_', '')} w{r.get('width', '?')}/b256 | "
                         + (r["error"] if "error" in r else
                            f"{_f(r['steps_per_s'])} steps/s -> 100K steps in {_f(r['seconds_100k'])} s") + " |")
    for key in ("sample_fp32", "sample_bf16"):
        r = res.get(key)
        if r:
            lines.append(f"| sample {key.replace('sample_', '')} ({r.get('sample_steps', '?')} steps) | "
                         + (r["error"] if "error" in r else
                            f"{_f(r['rows_per_s'], '{:,.0f}')} rows/s -> 1M rows in {_f(r['seconds_1m'])} s") + " |")
    peer = res.get("peer")
    if peer:
        lines.append("| ours vs lucidrains peer | " + (peer.get("error") or peer.get("skipped") or
                     f"{_f(peer['ours_steps_per_s'])} vs {_f(peer['peer_steps_per_s'])} steps/s "
                     f"({_f(peer['ratio'], '{:.2f}')}x)") + " |")
    mem = res["memory"]
    lines.append("| peak GPU memory | " + (mem.get("skipped") or f"{mem['peak_allocated_mib']:.0f} MiB allocated, "
                                            f"{mem['peak_reserved_mib']:.0f} MiB reserved") + " |")
    ts = res.get("train_smoke", {})
    lines.append("| `synther train` smoke | " + (ts.get("error") or f"exit {ts['returncode']}, "
                 f"{ts.get('retrains')} retrain(s), {_f(ts['seconds'])} s") + " |")
    lines += ["", "| goal (H100-class GPU) | measured | limit | met |", "| --- | --- | --- | --- |"]
    for g in res["goals"]:
        met = "n/a (not a GPU run)" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {_f(g['seconds'])} s | {g['limit_s']:.0f} s | {met} |")
    bad = failed_sections(res)
    lines += ["", f"Sections failed: {', '.join(bad)}" if bad else "All sections ran.",
              f"Total {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cuda', 'cuda:1', 'cpu'")
    p.add_argument("--quick", action="store_true", help="small sizes, no compile / peer sections (CI)")
    p.add_argument("--out", default="results/gpu_check", help="directory for gpu_check.json / gpu_check.md")
    args = p.parse_args(argv)
    res = run(args.device, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=float))
    md = markdown(res)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if not res["cuda"]:
        print("no CUDA device here: ran the CPU-sized subset; run it on a GPU machine for the real check")
        return 0
    return 1 if failed_sections(res) else 0


if __name__ == "__main__":
    sys.exit(main())
