"""Shared pytest fixtures for synther_buffer (CPU, tiny configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synther_buffer import SynthERConfig

# One intra-op thread for the whole session: on 2 shared cores, two torch threads competing with
# other processes (SB3 subprocess envs, other jobs) were measured ~200x slower on small nets.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg() -> SynthERConfig:
    """The "tiny" preset pinned to CPU (seconds per fit)."""
    return SynthERConfig.preset("tiny").replace(device="cpu")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run torch on one intra-op thread for the module, then restore.

    On the 2 shared cores of the dev/CI machines, two torch threads competing with other processes
    were measured ~200x slower on small nets (100 Adam steps: 63 s vs 0.26 s). Opt in with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_matmul_flags():
    """Restores torch's global matmul flags (TF32, float32 matmul precision) after the test
    (``helpers.matmul_flags_restored``)."""
    from helpers import matmul_flags_restored

    with matmul_flags_restored():
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded numpy generator per test."""
    return np.random.default_rng(0)


def make_mixture(n: int = 4000, modes=(-2.0, 2.0), mode_std: float = 0.3, y_std: float = 0.5,
                 seed: int = 0) -> np.ndarray:
    """2-D mixture of Gaussians, float32 [n, 2]: x ~ equal mix of N(m, mode_std^2) over ``modes``,
    y ~ N(0, y_std^2) independent of x."""
    r = np.random.default_rng(seed)
    centers = r.choice(np.asarray(modes, dtype=np.float64), size=n)
    x = centers + mode_std * r.standard_normal(n)
    y = y_std * r.standard_normal(n)
    return np.stack([x, y], axis=1).astype(np.float32)


@pytest.fixture(scope="session")
def make_mixture_2d():
    """The ``make_mixture(n, modes, mode_std, y_std, seed)`` helper, as a fixture."""
    return make_mixture


@pytest.fixture
def fake_diffusion(monkeypatch):
    """Make ``TransitionDiffusion.fit``/``sample`` instant: fit records the rows, sample returns a
    seeded bootstrap of them (float32 copies). Tests of schedules, pools and plumbing use it where
    the model's fidelity does not matter. ``fake_diffusion.calls`` counts fits."""
    from synther_buffer import TransitionDiffusion

    class Fake:
        calls = 0

    def fit(self, x, **kw):
        Fake.calls += 1
        self._fake_rows = np.array(x, dtype=np.float32, copy=True)
        self.fitted = True
        self.last_fit = {"loss": 0.25, "seconds": 0.001, "steps": 1, "batch_size": 1}
        return dict(self.last_fit)

    def sample(self, n, **kw):
        r = np.random.default_rng(1000 + self.sample_calls)
        self.sample_calls += 1
        return self._fake_rows[r.integers(0, len(self._fake_rows), size=n)].copy()

    monkeypatch.setattr(TransitionDiffusion, "fit", fit)
    monkeypatch.setattr(TransitionDiffusion, "sample", sample)
    return Fake
