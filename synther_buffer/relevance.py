"""Relevance functions for Prioritized Generative Replay (PGR; Wang, Frans, Abbeel, Levine, Efros, ICLR 2025).

PGR conditions SynthER's diffusion model on a scalar relevance score of each real transition and
generates at high relevance (classifier-free guidance, ``synther_buffer/guidance.py``). This module
holds the scores and what is done with them:

* :class:`CuriosityRelevance` (``SynthERConfig.relevance="curiosity"``, PGR's best): an ICM-style
  curiosity model (Pathak et al. 2017). A feature encoder phi(s), an inverse model g(phi(s), phi(s'))
  -> a that trains the encoder, and a forward model f(phi(s), a) -> phi(s'); the score of a row is the
  forward model's error ``mean((f(phi(s), a) - phi(s'))^2)`` over the features. It trains on the real
  rows at each retrain, continuing from the previous retrain's weights (PGR trains it continually
  beside the agent: one Adam step per env step, ``relevance_train_steps`` keeps that rate).
* :class:`RewardRelevance` (``"reward"``): the reward column.
* :class:`CallableRelevance` (a buffer's ``set_relevance_fn(fn)``): any function of the real rows, e.g.
  the TD error under the user's critic.
* score validation (:func:`check_scores`: NaN / inf refused with the first bad row named),
  normalisation (:class:`ScoreStats`, mean 0 / std 1) and the draw of the conditioning values at
  sampling time (:func:`top_fraction`, :func:`draw_conditions`: uniform over the scores of the top
  ``relevance_top_frac`` fraction of the real rows, as PGR draws them).

No RL framework is imported here.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .denoiser import init_parameters
from .layout import RowLayout

SCORE_BATCH = 16_384         # rows scored per forward pass
SYNTHETIC_SCORE_ROWS = 10_000   # synthetic rows scored for ``relevance_mean_synthetic``
CURIOSITY_BATCH = 256        # the curiosity model's training batch (PGR: the agent's batch, 256)
CURIOSITY_LR = 3e-4          # its Adam learning rate (PGR: the agent's, 3e-4)


class RelevanceError(ValueError):
    """A relevance function failed or returned unusable scores; the previous model and pool are kept."""


# ------------------------------------------------------------------------------ scores
def check_scores(scores, n: int, what: str = "relevance scores") -> np.ndarray:
    """``scores`` as a float64 vector of ``n`` finite values.

    Args:
        scores: one score per row (a numpy array, a torch tensor on any device, a list); [n] or [n, 1].
        n: the number of rows scored.
        what: names the scores in the messages.

    Returns:
        float64 numpy [n].

    Raises:
        RelevanceError: not numeric, the wrong number of values, or NaN / inf (the first bad row named).
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RelevanceError(f"{what} must be numbers, one per row: {e}") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != (n,):
        raise RelevanceError(f"{what} must hold one score per row ({n} rows), got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise RelevanceError(f"{what} contain {int((~finite).sum())} NaN/inf value(s) (first at row {bad}: "
                             f"{arr[bad]}); scores must be finite")
    return arr


class ScoreStats:
    """Normalisation of the scores a model is conditioned on: (s - mean) / std, fitted on the real scores.

    A constant score (std below 1e-12) is divided by 1: the condition then carries no information.

    Args:
        mean, std: the statistics (``fit`` computes them).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = float(mean), float(std)

    @classmethod
    def fit(cls, scores: np.ndarray) -> "ScoreStats":
        """The statistics of ``scores`` (finite, float)."""
        std = float(np.std(scores))
        return cls(float(np.mean(scores)), std if std > 1e-12 else 1.0)

    def normalize(self, scores) -> np.ndarray:
        """(s - mean) / std as float32."""
        return ((np.asarray(scores, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def top_fraction(scores: np.ndarray, frac: float) -> np.ndarray:
    """The scores of the top ``frac`` fraction of the rows (at least one), ascending.

    PGR conditions generation on values drawn from the highest-scoring ``top_frac`` of the real rows.
    """
    k = max(1, int(frac * len(scores)))
    return np.sort(np.asarray(scores, dtype=np.float64))[-k:].astype(np.float32)


def draw_conditions(top: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` conditioning values drawn uniformly with replacement from ``top`` (a local generator)."""
    rng = np.random.default_rng(seed)
    return top[rng.integers(0, len(top), size=n)]


# ------------------------------------------------------------------------------ relevance functions
class Relevance:
    """A relevance function: ``score(rows)`` of model-layout rows (concat(obs, action, reward, next_obs[, terminal])).

    Attributes:
        kind: ``"curiosity"``, ``"reward"`` or ``"custom"``.
        on_caller: scored on the caller's thread when the retrain is submitted (a user function may use
            the agent's networks), not in a background retrain's worker.
    """

    kind = ""
    on_caller = False

    def prepare(self, rows: np.ndarray, layout: RowLayout, seed: int) -> "Relevance":
        """The relevance function to score this retrain's ``rows`` with (trained on them if it learns).

        Pure: a learning function returns a trained copy and leaves ``self`` as it was, so a retrain
        that fails keeps the previous one.
        """
        return self

    def score(self, rows: np.ndarray, layout: RowLayout) -> np.ndarray:
        """One finite score per row (float64 [N])."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        pass


class RewardRelevance(Relevance):
    """The reward as the relevance score (PGR's "reward" relevance)."""

    kind = "reward"

    def score(self, rows: np.ndarray, layout: RowLayout) -> np.ndarray:
        return check_scores(rows[:, layout.reward_col], len(rows), "reward scores")


class CallableRelevance(Relevance):
    """A user's function of the real transitions, e.g. the TD error under the agent's critic.

    Args:
        fn: ``fn(batch)`` with ``batch`` a ``synther_buffer.ReplaySamples`` of CPU float32 tensors
            (``obs``, ``action``, ``reward``, ``next_obs``, ``terminated``; every real row at once, or
            the synthetic rows scored for ``stats()``), returning one score per row (numpy, tensor or
            list). It runs on the thread that adds the transitions.
    """

    kind = "custom"
    on_caller = True

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise ValueError(f"the relevance function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def score(self, rows: np.ndarray, layout: RowLayout) -> np.ndarray:
        from .mixing import ReplaySamples   # here: mixing imports the pool, which imports this module

        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        try:
            out = self.fn(ReplaySamples(*layout.split(t)))
        except Exception as e:
            raise RelevanceError(f"the relevance function raised {type(e).__name__}: {e}") from e
        return check_scores(out, len(rows), "scores returned by the relevance function")


class CuriosityNet(nn.Module):
    """ICM's networks (Pathak et al. 2017): encoder phi, inverse model g, forward model f.

    Args:
        obs_dim, action_dim: the transition's widths.
        hidden: hidden and feature width.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(obs_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden))
        self.inverse = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, action_dim))
        self.forward_model = nn.Sequential(nn.Linear(hidden + action_dim, hidden), nn.SiLU(),
                                           nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor):
        """``(phi(s'), f(phi(s), a), g(phi(s), phi(s')))``."""
        f_s, f_next = self.encoder(obs), self.encoder(next_obs)
        pred_next = self.forward_model(torch.cat([f_s, action], dim=1))
        pred_action = self.inverse(torch.cat([f_s, f_next], dim=1))
        return f_next, pred_next, pred_action


def curiosity_loss(net: CuriosityNet, obs, action, next_obs) -> torch.Tensor:
    """ICM's loss: forward error against the (detached) next features + inverse error on the action.

    L = mean((f(phi(s), a) - sg(phi(s')))^2) + mean((g(phi(s), phi(s')) - a)^2)
    """
    f_next, pred_next, pred_action = net(obs, action, next_obs)
    return ((pred_next - f_next.detach()) ** 2).mean() + ((pred_action - action) ** 2).mean()


def curiosity_score(net: CuriosityNet, obs, action, next_obs) -> torch.Tensor:
    """The curiosity of each row: mean over the features of (f(phi(s), a) - phi(s'))^2, [B]."""
    f_next, pred_next, _ = net(obs, action, next_obs)
    return ((pred_next - f_next) ** 2).mean(dim=1)


class CuriosityRelevance(Relevance):
    """Curiosity (PGR's best relevance): the forward-model error of an ICM trained on the real rows.

    Observations are standardised with the statistics of the rows of the latest retrain. The networks
    and their Adam state persist across retrains (``prepare`` continues training a copy).

    Args:
        obs_dim, action_dim: the transition's widths.
        hidden: the networks' width (``SynthERConfig.relevance_hidden``).
        steps: Adam steps per retrain (``relevance_train_steps``, default ``retrain_every``).
        seed: seeds the initial weights (a local generator: no global RNG is read).
        device: where the networks train.
    """

    kind = "curiosity"

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, steps: int = 1000, seed: int = 0,
                 device: str = "cpu"):
        self.obs_dim, self.action_dim, self.hidden, self.steps = int(obs_dim), int(action_dim), int(hidden), int(steps)
        self.device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 424_242)
        with torch.device("meta"):
            net = CuriosityNet(self.obs_dim, self.action_dim, self.hidden)
        self.net = init_parameters(net.to_empty(device="cpu"), gen).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=CURIOSITY_LR)
        self.obs_mean = np.zeros(self.obs_dim, dtype=np.float32)
        self.obs_std = np.ones(self.obs_dim, dtype=np.float32)
        self.trained_steps = 0
        self.last_loss = float("nan")

    def _fields(self, rows: np.ndarray, layout: RowLayout):
        o, a = layout.obs_dim, layout.action_dim
        obs = (rows[:, :o] - self.obs_mean) / self.obs_std
        nxt = (rows[:, o + a + 1:2 * o + a + 1] - self.obs_mean) / self.obs_std
        act = rows[:, o:o + a]
        return (torch.as_tensor(np.ascontiguousarray(v, dtype=np.float32), device=self.device)
                for v in (obs, act, nxt))

    def prepare(self, rows: np.ndarray, layout: RowLayout, seed: int) -> "CuriosityRelevance":
        new = copy.deepcopy(self)
        new.train(rows, layout, seed)
        return new

    def train(self, rows: np.ndarray, layout: RowLayout, seed: int) -> float:
        """``self.steps`` Adam steps on batches of ``rows`` (in place).

        Returns:
            The mean loss of the last 100 steps.

        Raises:
            RelevanceError: the loss turned non-finite.
        """
        o, a = layout.obs_dim, layout.action_dim
        both = np.concatenate([rows[:, :o], rows[:, o + a + 1:2 * o + a + 1]], axis=0)
        self.obs_mean = both.mean(axis=0).astype(np.float32)
        std = both.std(axis=0)
        self.obs_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        obs, act, nxt = self._fields(rows, layout)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        n, bs = obs.shape[0], min(CURIOSITY_BATCH, obs.shape[0])
        self.net.train()
        total, count = torch.zeros((), device=self.device), 0
        for step in range(self.steps):
            idx = torch.randint(n, (bs,), device=self.device, generator=gen)
            loss = curiosity_loss(self.net, obs.index_select(0, idx), act.index_select(0, idx),
                                  nxt.index_select(0, idx))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if step >= self.steps - 100:
                total += loss.detach()
                count += 1
        self.net.eval()
        self.trained_steps += self.steps
        self.last_loss = float(total / max(count, 1))
        if not math.isfinite(self.last_loss):
            raise RelevanceError(f"the curiosity model's loss became {self.last_loss}")
        return self.last_loss

    @torch.no_grad()
    def score(self, rows: np.ndarray, layout: RowLayout) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for i in range(0, len(rows), SCORE_BATCH):
            obs, act, nxt = self._fields(rows[i:i + SCORE_BATCH], layout)
            out[i:i + len(obs)] = curiosity_score(self.net, obs, act, nxt).double().cpu().numpy()
        return check_scores(out, len(rows), "curiosity scores")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "opt": _opt_to_cpu(self.opt.state_dict()), "obs_mean": self.obs_mean.tolist(),
                "obs_std": self.obs_std.tolist(), "trained_steps": self.trained_steps,
                "last_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.obs_mean = np.asarray(state["obs_mean"], dtype=np.float32)
        self.obs_std = np.asarray(state["obs_std"], dtype=np.float32)
        self.trained_steps = int(state["trained_steps"])
        self.last_loss = float(state["last_loss"])

    def __deepcopy__(self, memo):
        new = CuriosityRelevance.__new__(CuriosityRelevance)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("net", "opt")})
        new.net = copy.deepcopy(self.net)
        new.opt = torch.optim.Adam(new.net.parameters(), lr=CURIOSITY_LR)
        # load_state_dict keeps the tensors it is given: copy them, or prepare() on the copy moves this
        # model's Adam moments (a failed retrain must leave the previous relevance model as it was)
        new.opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        new.obs_mean, new.obs_std = self.obs_mean.copy(), self.obs_std.copy()
        return new


def _opt_to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _opt_to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_opt_to_cpu(v) for v in state]
    return state


def make_relevance(config, layout: RowLayout, device: str = "cpu") -> Optional[Relevance]:
    """The relevance function ``config.relevance`` names for rows of ``layout`` (None for plain SynthER).

    Args:
        config: a ``SynthERConfig`` (``relevance``, ``relevance_hidden``, ``relevance_train_steps``,
            ``retrain_every``, ``seed``).
        layout: the rows' layout.
        device: where a curiosity model trains.
    """
    if config.relevance is None:
        return None
    if config.relevance == "reward":
        return RewardRelevance()
    steps = config.relevance_train_steps or config.retrain_every
    return CuriosityRelevance(layout.obs_dim, layout.action_dim, config.relevance_hidden, steps, config.seed, device)


def relevance_from_state(config, layout: RowLayout, state: Optional[dict], device: str = "cpu") -> Optional[Relevance]:
    """Rebuild the pool's relevance function from its saved state (a custom function is not saved: None)."""
    rel = make_relevance(config, layout, device)
    if rel is not None and state is not None and state.get("kind") == rel.kind:
        rel.load_state_dict(state)
    return rel
