"""Ray's cost and speed-up for SynthER, measured on this machine (benchmarks/SCALE.md).

    python -m benchmarks.ray_scale retrain  [--preset tiny|fast] [--reps 5] [--rows 10000] [--train-steps N]
                                            [--num-generate N] [--out results.json]
    python -m benchmarks.ray_scale upsample [--reps 3] [--num-samples 65536] [--chunk-size 16384]
                                            [--train-steps 500] [--out results.json]

``retrain``: synchronous retrains of one ``SyntheticPool`` per backend on the same real rows
(HalfCheetah-sized: obs 17, action 6), alternating thread / ray; each retrain's wall clock minus the
fit and generate seconds the build itself measured is its overhead (data in and out, rebuilding the
model, filtering). The Ray backend's first retrain also starts the actor and is reported apart. Then
background retrains: the seconds ``retrain()`` blocks the caller (submission) and ``wait()``'s swap.

``upsample``: one fitted model (fast preset), then ``upsample`` in-process and with ``workers`` = 1 and
2 on a local Ray instance (2 CPUs, 1 per task), repeated in interleaved order (the machine is
shared); synthetic rows per second of wall clock over generation and merge. A first run per worker
count warms the Ray workers and is reported apart.

Both run torch on one thread in this process, as the Ray tasks and the actor do (1 CPU each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synther_buffer import SynthERConfig, offline
from synther_buffer.layout import RowLayout
from synther_buffer.pool import SyntheticPool

OBS, ACT = 17, 6


def real_rows(n: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    obs = r.standard_normal((n, OBS)).astype(np.float32)
    act = r.uniform(-1, 1, (n, ACT)).astype(np.float32)
    nxt = (0.9 * obs + 0.1 * act.sum(1, keepdims=True)).astype(np.float32)
    rew = (obs[:, 0] - (act ** 2).sum(1)).astype(np.float32)
    return RowLayout(OBS, ACT, False).join(obs, act, rew, nxt, np.zeros(n, np.float32))


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def bench_retrain(args) -> dict:
    import ray

    cfg = SynthERConfig.preset(args.preset).replace(device="cpu", progress=False, min_real=1, retrain_every=1)
    if args.train_steps:
        cfg = cfg.replace(train_steps=args.train_steps)
    if args.num_generate:
        cfg = cfg.replace(num_generate=args.num_generate, synthetic_size=args.num_generate)
    rows = real_rows(args.rows)
    layout = RowLayout(OBS, ACT, False)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        pools = {b: SyntheticPool(layout, cfg.replace(retrain_backend=b)) for b in ("thread", "ray")}
        out = {"config": cfg.to_dict(), "rows": args.rows, "dim": layout.dim, "sync": {"thread": [], "ray": []}}
        t0 = time.perf_counter()
        pools["ray"].step(1)
        pools["ray"].retrain(rows, background=False)
        p = pools["ray"]
        out["ray_first_retrain"] = {"wall": time.perf_counter() - t0, "fit": p.last_fit_seconds,
                                    "generate": p.last_generate_seconds}
        for rep in range(args.reps):
            for b in (("thread", "ray") if rep % 2 == 0 else ("ray", "thread")):
                p = pools[b]
                p.step(1)
                t0 = time.perf_counter()
                ok = p.retrain(rows, background=False)
                wall = time.perf_counter() - t0
                assert ok, f"{b} retrain failed"
                out["sync"][b].append({"wall": wall, "fit": p.last_fit_seconds, "generate": p.last_generate_seconds,
                                       "overhead": wall - p.last_fit_seconds - p.last_generate_seconds})
                print(f"sync {b:6s} rep {rep}: wall {wall:.2f}s fit {p.last_fit_seconds:.2f}s generate "
                      f"{p.last_generate_seconds:.2f}s overhead {out['sync'][b][-1]['overhead']:.3f}s", flush=True)
        out["background"] = {"thread": [], "ray": []}
        for rep in range(args.reps):
            for b in ("thread", "ray"):
                p = pools[b]
                p.step(1)
                t0 = time.perf_counter()
                p.retrain(rows, background=True)
                submit = time.perf_counter() - t0
                p._worker.join()                      # finished, not yet installed
                t0 = time.perf_counter()
                p.poll()
                swap = time.perf_counter() - t0
                out["background"][b].append({"submit": submit, "swap": swap})
                print(f"background {b:6s} rep {rep}: submit {submit * 1e3:.1f} ms, swap {swap * 1e3:.1f} ms",
                      flush=True)
    finally:
        ray.shutdown()
    out["summary"] = {
        b: {"overhead_s": _stats([r["overhead"] for r in out["sync"][b]]),
            "wall_s": _stats([r["wall"] for r in out["sync"][b]]),
            "submit_ms": _stats([1e3 * r["submit"] for r in out["background"][b]]),
            "swap_ms": _stats([1e3 * r["swap"] for r in out["background"][b]])} for b in ("thread", "ray")}
    return out


def bench_upsample(args) -> dict:
    import ray

    cfg = SynthERConfig.preset("fast").replace(device="cpu", progress=False, train_steps=args.train_steps)
    rows = real_rows(10_000)
    layout = RowLayout(OBS, ACT, False)
    data = {"observations": rows[:, :OBS], "actions": rows[:, OBS:OBS + ACT], "rewards": rows[:, OBS + ACT],
            "next_observations": rows[:, OBS + ACT + 1:OBS + ACT + 1 + OBS],
            "terminals": np.zeros(len(rows), np.float32)}
    model = offline.make_model(layout, layout.dim, cfg)
    model.fit(rows)
    kw = dict(num_samples=args.num_samples, chunk_size=args.chunk_size, model=model, seed=1, progress=False,
              write_json=False)
    out = {"num_samples": args.num_samples, "chunk_size": args.chunk_size, "dim": layout.dim, "runs": []}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="ray-scale-", dir=args.tmp) as d:
            order = [None, 1, 2]
            for w in (1, 2):    # warm the Ray workers
                s = offline.upsample(data, Path(d) / "o.npy", workers=w, **kw)
                out["runs"].append({"workers": w, "warmup": True, "generate_s": s["generate_seconds"]})
                print(f"warm-up workers={w}: {s['generate_seconds']:.1f}s", flush=True)
            for rep in range(args.reps):
                for w in (order if rep % 2 == 0 else order[::-1]):
                    s = offline.upsample(data, Path(d) / "o.npy", workers=w, **kw)
                    rate = s["num_synthetic"] / s["generate_seconds"]
                    run = {"workers": w, "warmup": False, "generate_s": s["generate_seconds"], "rows_per_s": rate,
                           "shards": [{k: sh[k] for k in ("rows", "seconds", "load_seconds", "sample_seconds")}
                                      for sh in s.get("shards") or ()]}
                    out["runs"].append(run)
                    print(f"rep {rep} workers={w}: {s['generate_seconds']:.1f}s, {rate:,.0f} rows/s "
                          + " ".join(f"[shard {sh['seconds']:.1f}s, sampling {sh['sample_seconds']:.1f}s]"
                                     for sh in run["shards"]), flush=True)
    finally:
        ray.shutdown()
    rates = {str(w): [r["rows_per_s"] for r in out["runs"] if r["workers"] == w and not r["warmup"]]
             for w in (None, 1, 2)}
    out["summary"] = {w: _stats(v) for w, v in rates.items()}
    r1, r2 = statistics.median(rates["1"]), statistics.median(rates["2"])
    out["summary"]["scaling_efficiency_2_vs_1"] = r2 / (2 * r1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_scale", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("retrain", help="Ray actor vs thread: overhead per retrain")
    r.add_argument("--preset", choices=("tiny", "fast"), default="tiny")
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--rows", type=int, default=10_000)
    r.add_argument("--train-steps", type=int, default=None)
    r.add_argument("--num-generate", type=int, default=None)
    u = sub.add_parser("upsample", help="sharded upsample: rows/s at workers = 1, 2")
    u.add_argument("--reps", type=int, default=3)
    u.add_argument("--num-samples", type=int, default=65_536)
    u.add_argument("--chunk-size", type=int, default=16_384)
    u.add_argument("--train-steps", type=int, default=500)
    u.add_argument("--tmp", default=None, help="directory for the outputs (default: the system temp dir)")
    for q in (r, u):
        q.add_argument("--out", default=None, help="write the measurements here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = bench_retrain(args) if args.what == "retrain" else bench_upsample(args)
    print(json.dumps(res["summary"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
