"""A soak of ``GenerativeReplay``: many adds, a sample every step, a retrain every ``--every`` steps.

Run as a script (``python tests/soak_run.py --adds 200000 --every 2000 --mode async``) in a process
of its own, so the resident memory it reports is the buffer's alone. Prints one JSON object: the
RSS, threads and open file descriptors after the ``--probe`` th retrain and after the last one, the
retrain and failure counts, and the seconds taken.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time

import numpy as np
import torch


def rss_mib() -> float:
    """This process's resident set size (Linux ``/proc/self/status`` VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def snapshot() -> dict:
    gc.collect()
    return {"rss_mib": round(rss_mib(), 2), "threads": threading.active_count(),
            "open_fds": len(os.listdir("/proc/self/fd"))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adds", type=int, required=True)
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--probe", type=int, default=10, help="retrain after which the first snapshot is taken")
    p.add_argument("--mode", choices=("sync", "async"), required=True)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--generate", type=int, default=20_000,
                   help="synthetic rows per retrain (the pool): large enough that keeping old pools would show")
    p.add_argument("--sample-steps", type=int, default=8,
                   help="sampler steps: few, since memory per pool does not depend on them")
    p.add_argument("--agent-work", type=int, default=256,
                   help="per env step the 'agent' multiplies two [N, N] matrices (a gradient step's worth of "
                        "kernel time, during which torch releases the GIL as a real agent's update does); 0 = none")
    p.add_argument("--wait-each", action="store_true",
                   help="async: wait for each background retrain before the next add, so every scheduled "
                        "retrain runs whatever the machine's load (the count is then exact)")
    p.add_argument("--capacity", type=int, default=10_000,
                   help="real ring size; small, so the ring is full (its pages touched) long before the probe")
    args = p.parse_args()
    torch.set_num_threads(1)

    from synther_buffer import GenerativeReplay, SynthERConfig

    cfg = SynthERConfig.preset("tiny").replace(device="cpu", retrain_every=args.every, train_steps=args.train_steps,
                                              num_generate=args.generate, synthetic_size=args.generate,
                                              sample_steps=args.sample_steps,
                                              async_retrain=args.mode == "async")
    obs_dim, act_dim = 6, 2
    buf = GenerativeReplay(obs_dim, act_dim, capacity=args.capacity, config=cfg, model_terminals=False)
    submitted = [0]
    retrain = buf.pool.retrain

    def counted_retrain(*a, **kw):   # every retrain handed to the pool, sync or background
        submitted[0] += 1
        return retrain(*a, **kw)

    buf.pool.retrain = counted_retrain
    rng = np.random.default_rng(0)
    obs = rng.standard_normal(obs_dim).astype(np.float32)
    probes, seen, t0 = {}, 0, time.perf_counter()
    for step in range(args.adds):
        action = rng.uniform(-1, 1, act_dim).astype(np.float32)
        nxt = (0.9 * obs + 0.1 * np.pad(action, (0, obs_dim - act_dim))).astype(np.float32)
        before = submitted[0]
        buf.add(obs, action, float(nxt.sum()), nxt, False)
        if args.wait_each and submitted[0] != before:
            buf.wait()
        obs = nxt if step % 1000 else rng.standard_normal(obs_dim).astype(np.float32)
        batch = buf.sample(256)
        if args.agent_work:
            w = torch.ones(args.agent_work, args.agent_work)
            torch.mm(w, w).sum().add_(batch.obs.sum())
        count = buf.stats()["retrain_count"]
        if count != seen:
            seen = count
            if count >= args.probe and "probe" not in probes:
                probes["probe"] = {"retrain": count, **snapshot()}
    buf.wait()
    s = buf.stats()
    probes["last"] = {"retrain": s["retrain_count"], **snapshot()}
    print(json.dumps({"mode": args.mode, "adds": args.adds, "every": args.every,
                      "scheduled_retrains": args.adds // args.every, "submitted_retrains": submitted[0],
                      "retrain_count": s["retrain_count"],
                      "failed_retrains": s.get("failed_retrains", 0), "seconds": round(time.perf_counter() - t0, 1),
                      **probes}))


if __name__ == "__main__":
    main()
