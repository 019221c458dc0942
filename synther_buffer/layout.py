"""RowLayout: where each field of a transition sits in a flat row (seed A).

A row is ``concat(obs, action, reward, next_obs[, terminal])``, float32. The same layout serves the
online buffers (real rows always carry the terminal column; the diffusion model sees it only where
terminals are modelled) and the offline datasets (``synther_buffer.datasets.to_rows`` / ``from_rows``).
Only numpy is imported here.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .validation import positive_int


def _positive_int(name: str, value) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is a positive int (bool is not).

    Args:
        name: the argument's name, for the message.
        value: the value to check (python or numpy integer).

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer >= 1.
    """
    return positive_int(name, value)


@dataclass(frozen=True)
class RowLayout:
    """The columns of a transition row: ``obs | action | reward | next_obs [| terminal]``.

    Attributes:
        obs_dim: observation width (a positive int).
        action_dim: action width (a positive int).
        terminal: whether the row carries the terminal column (the last one).
        timeouts: whether a dataset the rows came from had a ``timeouts`` key (``from_rows`` writes
            it back); the online buffers leave it False.
        terminal_dtype: numpy dtype name that ``from_rows`` gives ``terminals`` / ``timeouts``.

    Raises:
        ValueError: ``obs_dim`` or ``action_dim`` is not a positive int.
    """

    obs_dim: int
    action_dim: int
    terminal: bool = False
    timeouts: bool = False
    terminal_dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive_int("obs_dim", self.obs_dim)
        _positive_int("action_dim", self.action_dim)

    # ------------------------------------------------------------------ columns
    @property
    def dim(self) -> int:
        """Row width D."""
        return 2 * self.obs_dim + self.action_dim + 1 + int(self.terminal)

    @property
    def reward_col(self) -> int:
        """Index of the reward column."""
        return self.obs_dim + self.action_dim

    @property
    def action_cols(self) -> slice:
        """Slice of the action columns."""
        return slice(self.obs_dim, self.obs_dim + self.action_dim)

    @property
    def terminal_col(self) -> Optional[int]:
        """Index of the terminal column, or None when the row has none."""
        return self.dim - 1 if self.terminal else None

    @property
    def terminal_dims(self) -> Tuple[int, ...]:
        """The terminal column as a tuple (empty when there is none), as ``TransitionDiffusion`` takes it."""
        return (self.dim - 1,) if self.terminal else ()

    @property
    def model_terminals(self) -> bool:
        """Deprecated name of ``terminal``."""
        warnings.warn("RowLayout.model_terminals is deprecated; use RowLayout.terminal", DeprecationWarning,
                      stacklevel=2)
        return self.terminal

    def with_terminal(self, terminal: bool) -> "RowLayout":
        """The same layout (a plain ``RowLayout``) with or without the terminal column."""
        return RowLayout(self.obs_dim, self.action_dim, bool(terminal), self.timeouts, self.terminal_dtype)

    def slices(self) -> Dict[str, slice]:
        """Column slice of each dataset key (``terminals`` only when the row has the column)."""
        o, a = self.obs_dim, self.action_dim
        out = {"observations": slice(0, o), "actions": slice(o, o + a), "rewards": slice(o + a, o + a + 1),
               "next_observations": slice(o + a + 1, 2 * o + a + 1)}
        if self.terminal:
            out["terminals"] = slice(2 * o + a + 1, 2 * o + a + 2)
        return out

    def column_names(self) -> List[str]:
        """One name per column: ``obs_0 .. action_0 .. reward next_obs_0 .. [terminal]``."""
        names = [f"obs_{i}" for i in range(self.obs_dim)] + [f"action_{i}" for i in range(self.action_dim)]
        names += ["reward"] + [f"next_obs_{i}" for i in range(self.obs_dim)]
        return names + (["terminal"] if self.terminal else [])

    def to_dict(self) -> dict:
        """Plain-python dict (JSON friendly)."""
        return asdict(self)

    # ------------------------------------------------------------------ rows <-> fields
    def join(self, obs, action, reward, next_obs, terminated) -> np.ndarray:
        """Rows [B, D] float32 from batched fields.

        Args:
            obs, action, next_obs: [B, ...] arrays (flattened per row).
            reward, terminated: [B] or [B, 1]; ``terminated`` is ignored when the row has no terminal column.

        Returns:
            A new float32 array [B, D].
        """
        b = obs.shape[0]
        parts = [obs.reshape(b, self.obs_dim), action.reshape(b, self.action_dim), reward.reshape(b, 1),
                 next_obs.reshape(b, self.obs_dim)]
        if self.terminal:
            parts.append(terminated.reshape(b, 1))
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=1)

    def split(self, rows):
        """Views of rows [B, D] (numpy or torch) as (obs, action, reward [B], next_obs, terminated [B]).

        Without a terminal column ``terminated`` is zeros of the rows' type and device.
        """
        o, a = self.obs_dim, self.action_dim
        r = o + a
        obs, action, reward = rows[:, :o], rows[:, o:r], rows[:, r]
        next_obs = rows[:, r + 1:r + 1 + o]
        terminated = rows[:, -1] if self.terminal else rows[:, 0] * 0
        return obs, action, reward, next_obs, terminated


class TransitionLayout(RowLayout):
    """Deprecated: ``RowLayout(obs_dim, action_dim, terminal=model_terminals)``.

    Kept so that ``synther_buffer.pool.TransitionLayout(...)`` still builds a layout and pickles made
    by version 0.1.0 (whose pools hold a ``TransitionLayout``) still load; ``SyntheticPool`` turns it
    into a plain ``RowLayout`` when unpickled.
    """

    def __init__(self, obs_dim: int, action_dim: int, model_terminals: bool = False):
        warnings.warn("TransitionLayout is deprecated; use synther_buffer.layout.RowLayout(obs_dim, action_dim, "
                      "terminal=...)", DeprecationWarning, stacklevel=2)
        super().__init__(obs_dim, action_dim, terminal=bool(model_terminals))

    def __setstate__(self, state: dict) -> None:
        """0.1.0 pickles carry ``model_terminals``, today's carry ``terminal``."""
        fields = {"timeouts": False, "terminal_dtype": "float32", **state}
        fields["terminal"] = bool(fields.pop("model_terminals", fields.get("terminal", False)))
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def as_row_layout(self) -> RowLayout:
        """The same columns as a plain ``RowLayout``."""
        return self.with_terminal(self.terminal)
