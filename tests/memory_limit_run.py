"""Runs TransitionDiffusion under a real address-space limit (``RLIMIT_AS``), for tests/test_memory_fallback.py.

Own process: the limit would break the pytest process. Fits a small model, measures the address space
in use once everything is initialised (a small sample drawn first), then lowers the soft limit so that
``--headroom-mib`` more can be allocated: a sample batch of ``--rows`` rows cannot, smaller ones can.
Prints one JSON line with what happened; lifts the limit again before computing the references.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource

import numpy as np
import torch

from synther_buffer import SynthERConfig, TransitionDiffusion
from synther_buffer.diffusion import DiffusionTrainingError


def address_space() -> int:
    """Bytes of virtual address space this process uses now (VmSize)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--headroom-mib", type=int, default=64)
    p.add_argument("--sampler", default="stochastic")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (4 or more give the stochastic one churn)")
    args = p.parse_args()
    torch.set_num_threads(1)
    logs = io.StringIO()
    logging.basicConfig(stream=logs, level=logging.WARNING)

    cfg = SynthERConfig.preset("tiny").replace(device="cpu", train_steps=30, sample_steps=args.steps,
                                                   sampler=args.sampler)
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    model = TransitionDiffusion(8, cfg)
    model.fit(x)
    model.sample(2_000, batch_size=1_000, seed=1)      # every lazy initialisation done before measuring
    before_fit = model.sample(100, seed=7)

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    headroom = args.headroom_mib * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom, hard))
    try:
        y = model.sample(args.rows, batch_size=args.rows, seed=5)
        sample_logs = logs.getvalue()
        try:    # a fit whose training batch cannot be allocated: a DiffusionTrainingError, model kept
            model.config = cfg.replace(batch_size=args.rows)
            model.fit(x, steps=5)
            fit_error = None
        except DiffusionTrainingError as e:
            fit_error = str(e)
        model.config = cfg
        n_logs = len(logs.getvalue())

        def unrelated(precision):
            raise RuntimeError("unrelated failure")

        model._sampling_network = unrelated   # any other RuntimeError is not taken for a memory failure
        try:
            model.sample(10, batch_size=8, seed=5)
            other = None
        except RuntimeError as e:
            other = str(e)
        del model._sampling_network
        other_retried = "out of memory" in logs.getvalue()[n_logs:]
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    fallbacks = [int(line.rsplit(" ", 1)[1]) for line in sample_logs.splitlines()
                 if "out of memory while sampling" in line]
    final = fallbacks[-1] if fallbacks else args.rows
    ref = model.sample(args.rows, batch_size=final, seed=5)
    other_bs = model.sample(args.rows, batch_size=final // 2, seed=5)
    print(json.dumps({
        "shape": list(y.shape), "fallbacks": fallbacks, "sample_logs": sample_logs,
        "equal_to_final_batch_size": bool(np.array_equal(y, ref)),
        "equal_to_half_of_it": bool(np.array_equal(y, other_bs)),
        "finite": bool(np.isfinite(y).all()),
        "fit_error": fit_error, "model_kept": bool(np.array_equal(model.sample(100, seed=7), before_fit)),
        "other_error": other, "other_retried": other_retried,
    }))


if __name__ == "__main__":
    main()
