"""The five fields of a transition as the buffers take them: shape and dtype checks with named errors.

Every buffer in the package takes a transition as ``(obs, action, reward, next_obs, terminated)``.
Shapes are checked field by field, so that a wrong one is named in a ``ValueError`` instead of
surfacing as a numpy reshape error, and the argument order of stable-baselines3 / CleanRL
(``add(obs, next_obs, action, reward, done, ...)``) is recognised and named when it is passed
positionally to ``GenerativeReplay.add``. Torch tensors stay tensors here (no device copy); other
values become numpy arrays. Only numpy and torch are imported.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .layout import RowLayout

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")
SB3_ORDER_HINT = ("the arguments look like stable-baselines3's order add(obs, next_obs, action, reward, done); "
                  "this buffer takes add(obs, action, reward, next_obs, terminated): pass them as keywords, "
                  "add(obs=..., action=..., reward=..., next_obs=..., terminated=...)")


def as_numeric(name: str, value):
    """``value`` as a numeric torch tensor (kept as it is) or numpy array.

    Args:
        name: the field's name, for the message.
        value: a tensor, an array, a list or a scalar.

    Returns:
        The tensor unchanged, or ``np.asarray(value)``.

    Raises:
        ValueError: the values are not real numbers or bools (strings, objects, complex numbers).
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real-valued, got dtype {value.dtype}")
        return value
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    return arr


def trailing_shapes(obs_dim: int, action_dim: int) -> Dict[str, tuple]:
    """The per-transition shape of each field: obs/next_obs ``(obs_dim,)``, action ``(action_dim,)``,
    reward/terminated ``()``."""
    return {"obs": (obs_dim,), "action": (action_dim,), "reward": (), "next_obs": (obs_dim,), "terminated": ()}


def _fits(shape: tuple, trailing: tuple, batch: Optional[int]) -> bool:
    """Whether ``shape`` is a field of ``trailing`` shape, for one transition (``batch`` None) or ``batch``."""
    if batch is None:
        return shape == trailing
    return shape == (batch,) + trailing or (not trailing and shape == (batch, 1))


def check_fields(values: Sequence, obs_dim: int, action_dim: int, *, batch: Optional[int] = None,
                 single_ok: bool = False, source: str = "") -> Tuple[List, Optional[int]]:
    """Check the five fields' dtypes and shapes against the buffer's widths.

    Args:
        values: ``(obs, action, reward, next_obs, terminated)``.
        obs_dim: observation width.
        action_dim: action width.
        batch: the number of transitions the fields must hold; None: ``obs.shape[0]``.
        single_ok: a 1-D ``obs`` means one transition (fields without the batch dimension).
        source: where the fields came from, appended to messages (``"sample_real(32)"``, say).

    Returns:
        ``(fields, b)``: the fields as tensors or numpy arrays, and the batch size (None for one
        transition given without a batch dimension).

    Raises:
        ValueError: not five fields, a non-numeric field, or a field of the wrong shape, named with
            the shape expected. Where the shapes say the fields came in stable-baselines3's order,
            the message says so (always told apart, except a batch with ``obs_dim == action_dim == 1``
            and [B, 1] rewards, where both orders have the same shapes).
    """
    where = f" (from {source})" if source else ""
    if len(values) != len(FIELDS):
        raise ValueError(f"expected 5 fields {FIELDS}, got {len(values)}{where}")
    fields = [as_numeric(name, v) for name, v in zip(FIELDS, values)]
    obs_shape = tuple(fields[0].shape)
    if single_ok and len(obs_shape) == 1:
        b = None
    elif batch is not None:
        b = int(batch)
    elif len(obs_shape) >= 1:
        b = obs_shape[0]
    else:
        b = -1   # a 0-d obs: nothing fits, the message below names it
    shapes = trailing_shapes(obs_dim, action_dim)
    for name, f in zip(FIELDS, fields):
        if not _fits(tuple(f.shape), shapes[name], b):
            expected = shapes[name] if b is None else (b,) + shapes[name]
            alt = " or (B, 1)" if b is not None and not shapes[name] else ""
            hint = f"; {SB3_ORDER_HINT}" if _sb3_order(fields, shapes, b) else ""
            raise ValueError(f"{name} has shape {tuple(f.shape)}, expected {expected}{alt} "
                             f"(obs_dim={obs_dim}, action_dim={action_dim}){where}{hint}")
    return fields, b


def _sb3_order(fields: List, shapes: Dict[str, tuple], b: Optional[int]) -> bool:
    """Whether fields given as (obs, action, reward, next_obs, terminated) are really SB3's
    (obs, next_obs, action, reward, done): an obs where the action goes, an action where the
    reward goes and a reward where next_obs goes."""
    _, action, reward, next_obs, _ = (tuple(f.shape) for f in fields)
    return (_fits(action, shapes["obs"], b) and _fits(reward, shapes["action"], b)
            and _fits(next_obs, shapes["reward"], b))


def join_rows(fields: Sequence, layout: RowLayout, device: Optional[torch.device] = None) -> torch.Tensor:
    """Store rows [B, D] float32 from checked, batched fields, as a tensor on ``device``.

    All-tensor fields are concatenated with torch on their own device and then moved (no host round
    trip when they already sit on ``device``); otherwise the rows are built with numpy.

    Args:
        fields: ``(obs, action, reward, next_obs, terminated)``, each [B, ...] (from ``check_fields``).
        layout: the row layout (with the terminal column).
        device: where the rows go; None: the tensors' device (the CPU for numpy fields).

    Returns:
        A float32 tensor [B, layout.dim].
    """
    if all(isinstance(f, torch.Tensor) for f in fields):
        target = fields[0].device if device is None else device
        b = fields[0].shape[0]
        widths = (layout.obs_dim, layout.action_dim, 1, layout.obs_dim, 1)[:4 + int(layout.terminal)]
        parts = [f.detach().to(target, torch.float32).reshape(b, w) for f, w in zip(fields, widths)]
        return torch.cat(parts, dim=1)
    arrays = [f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f for f in fields]
    rows = torch.from_numpy(layout.join(*arrays))
    return rows if device is None else rows.to(device)


def check_terminals(rows: np.ndarray, source: str = "") -> None:
    """Raise ``ValueError`` unless the terminal column (the last) of store rows holds only 0 and 1.

    Args:
        rows: store rows [N, D] (terminal last).
        source: where they came from, for the message.
    """
    if not np.isin(rows[:, -1], (0.0, 1.0)).all():
        where = f" (from {source})" if source else ""
        raise ValueError("terminated must hold 0/1 (or bool) values: the true terminal flag, not a probability "
                         f"(for an SB3-style buffer: dones * (1 - timeouts)){where}")
