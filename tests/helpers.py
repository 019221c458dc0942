"""Small helpers shared by the tests: buffer data (test_pool.py, test_replay.py), global torch flags."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from synther_buffer import SynthERConfig

OBS, ACT = 3, 2


def small(cfg: SynthERConfig, **changes) -> SynthERConfig:
    """Tiny preset cut down further: fidelity does not matter in these tests (~0.7 s per retrain)."""
    base = dict(train_steps=200, num_generate=500, synthetic_size=500, retrain_every=100, min_real=50)
    base.update(changes)
    return cfg.replace(**base)


def transitions(n: int, seed: int = 0, term_p: float = 0.0):
    """A deterministic batch of n transitions (obs 3, action 2), float32."""
    r = np.random.default_rng(seed)
    obs = r.standard_normal((n, OBS)).astype(np.float32)
    act = r.uniform(-1, 1, (n, ACT)).astype(np.float32)
    nxt = (0.9 * obs + 0.1 * act[:, :1]).astype(np.float32)
    rew = (obs[:, 0] - act[:, 0] ** 2).astype(np.float32)
    term = (r.random(n) < term_p).astype(np.float32)
    return obs, act, rew, nxt, term


@contextmanager
def matmul_flags_restored() -> Iterator[None]:
    """Restore torch's process-global matmul flags on exit: ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32`` and ``torch.get_float32_matmul_precision()`` (which the first one
    moves too). A test that sets them (the CUDA tests do) must not change the tests that run after it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]   # first: it sets the precision as well
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])
