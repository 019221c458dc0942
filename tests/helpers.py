"""Small data helpers shared by the buffer tests (test_pool.py, test_replay.py)."""

from __future__ import annotations

import numpy as np

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
