"""Transition datasets: load .npz / D4RL HDF5 / Minari / .npy files, validate them, convert to/from rows.

Inputs (``load_transitions`` / ``load_array``):

* ``.npz`` with keys ``observations``, ``actions``, ``rewards``, ``next_observations``, ``terminals``
  and optionally ``timeouts`` (extra keys are ignored);
* a D4RL-format HDF5 file (``.hdf5`` / ``.h5``) with the same keys at top level. A file without
  ``next_observations`` but with ``timeouts`` gets them the way ``d4rl.qlearning_dataset`` does
  (``next_obs[i] = obs[i + 1]``, rows ending in a timeout and the last row dropped);
* a local Minari dataset directory (nothing is downloaded): ``DIR/data/main_data.hdf5`` (or
  ``DIR/main_data.hdf5``, or that file itself) is read with h5py, one group per episode with
  ``observations`` [T+1], ``actions`` [T], ``rewards`` [T], ``terminations`` [T], ``truncations`` [T]
  (a Dict observation group is flattened: sub-arrays concatenated in sorted key order);
* a plain ``.npy`` float array [N, D]: any flat vector, e.g. the seed's V-D4RL latent transitions
  (section F: ``(pi_trunk(h), Q_trunk(h), a, r, pi_trunk(h'), Q_trunk(h'))``, D = 4 * 50 + |a| + 1).
  Feed one with ``np.save("latents.npy", rows.astype(np.float32))`` and
  ``synther upsample latents.npy --num-samples 1000000 --out synthetic.npy``; it writes a
  [num_samples, D] ``.npy``. No column is treated as a terminal there; to model latent terminals,
  save the latents in the transition key format instead (``observations`` = actor/critic features
  of h, ``next_observations`` = those of h') and upsample the ``.npz``.

Row layout (seed A): ``concat(obs, action, reward, next_obs[, terminal])``, described by
``synther_buffer.layout.RowLayout`` (the layout the online buffers use too). The terminal column is
modelled only if some terminal in the data is 1 (``model_terminals=None``); otherwise it is left out
of the diffusion model and written as 0. Everything is converted to float32.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .layout import RowLayout

PathLike = Union[str, os.PathLike]
Transitions = Dict[str, np.ndarray]

REQUIRED_KEYS: Tuple[str, ...] = ("observations", "actions", "rewards", "next_observations", "terminals")
OPTIONAL_KEYS: Tuple[str, ...] = ("timeouts",)
NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".hdf5", ".h5")
NPY_SUFFIXES = (".npy",)


# ---------------------------------------------------------------------------------------------- loading
def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _import_h5py():
    from .extras import require
    return require("h5py", "offline", "reading/writing HDF5 (D4RL or Minari)")


def load_transitions(path: PathLike) -> Transitions:
    """Load a transition dataset into a dict of numpy arrays (validated, see ``validate_transitions``).

    ``path`` may be a ``.npz``, a D4RL-format ``.hdf5``/``.h5`` file, a Minari ``main_data.hdf5``, or a
    local Minari dataset directory. Raises ``FileNotFoundError`` if it does not exist and
    ``ValueError`` for unknown file types, missing keys or mismatched lengths. A plain ``.npy``
    array is not a transition dataset: use ``load_array`` (``load_source`` accepts both).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    if p.is_dir():
        return validate_transitions(_load_minari(_minari_file(p)), source=str(p))
    suf = _suffix(p)
    if suf in NPZ_SUFFIXES:
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files if k in REQUIRED_KEYS + OPTIONAL_KEYS}
                files = list(z.files)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise ValueError(f"could not read {p} as .npz: {type(e).__name__}: {e}") from None
        _require_keys(data, files, p)
        return validate_transitions(data, source=str(p))
    if suf in HDF5_SUFFIXES:
        return validate_transitions(_load_hdf5(p), source=str(p))
    if suf in NPY_SUFFIXES:
        raise ValueError(f"{p} is a plain array, not a transition dataset; use load_array() "
                         "(or load_source(), which accepts both)")
    raise ValueError(f"unknown dataset type {p.name!r}: expected .npz, .hdf5/.h5 (D4RL or Minari), "
                     ".npy (plain [N, D] array) or a Minari dataset directory")


def load_array(path: PathLike) -> np.ndarray:
    """Load a plain float array [N, D] from a ``.npy`` file (any flat vectors, e.g. V-D4RL latents)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"array not found: {p}")
    if _suffix(p) not in NPY_SUFFIXES:
        raise ValueError(f"load_array expects a .npy file, got {p.name!r}")
    try:
        x = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"could not read {p} as .npy: {type(e).__name__}: {e}") from None
    return _check_array(x, str(p))


def load_source(path: PathLike) -> Union[Transitions, np.ndarray]:
    """``load_array`` for ``.npy`` files, ``load_transitions`` for everything else."""
    p = Path(path)
    if p.is_file() and _suffix(p) in NPY_SUFFIXES:
        return load_array(p)
    return load_transitions(p)


def _check_array(x: np.ndarray, source: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{source}: expected a real numeric array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D array [N, D], got shape {x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{source}: need at least 2 rows and 1 column, got shape {x.shape}")
    _check_finite(x, source)
    return x


def _require_keys(data: Mapping[str, Any], available: Sequence[str], source: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        hint = (" (a D4RL HDF5 file without next_observations needs timeouts to derive them)"
                if missing == ["next_observations"] else "")
        raise ValueError(f"{source}: missing key(s) {missing}; a transition dataset needs {list(REQUIRED_KEYS)} "
                         f"(found {sorted(available)}){hint}")


def _open_hdf5(p: Path):
    """``h5py.File(p, "r")``; an unreadable file raises ValueError naming it."""
    h5py = _import_h5py()
    try:
        return h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"could not open {p} as HDF5: {e}") from None


def _load_hdf5(p: Path) -> Transitions:
    h5py = _import_h5py()
    with _open_hdf5(p) as f:
        keys = list(f.keys())
        if "observations" not in f and any(k.startswith("episode_") for k in keys):
            return _read_minari_episodes(f, p)
        data = {k: np.asarray(f[k][()]) for k in REQUIRED_KEYS + OPTIONAL_KEYS
                if k in f and isinstance(f[k], h5py.Dataset)}
    if "next_observations" not in data and "observations" in data and "timeouts" in data:
        data = _derive_next_observations(data)
    _require_keys(data, keys, p)
    return data


def _derive_next_observations(data: Transitions) -> Transitions:
    """``d4rl.qlearning_dataset``: next_obs[i] = obs[i + 1]; drop rows that end in a timeout, and the last."""
    n = len(data["observations"])
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"mismatched lengths: {lengths}")
    timeouts = np.asarray(data["timeouts"]).reshape(n, -1)[:, 0].astype(bool)
    keep = np.nonzero(~timeouts[:-1])[0]
    out = {k: np.asarray(v)[keep] for k, v in data.items()}
    out["next_observations"] = np.asarray(data["observations"])[keep + 1]
    return out


def _minari_file(d: Path) -> Path:
    for cand in (d / "data" / "main_data.hdf5", d / "main_data.hdf5"):
        if cand.is_file():
            return cand
    raise ValueError(f"{d} is not a Minari dataset directory (no data/main_data.hdf5); "
                     "pass a .npz, .hdf5/.h5, .npy file or a local Minari dataset directory")


def _load_minari(p: Path) -> Transitions:
    with _open_hdf5(p) as f:
        return _read_minari_episodes(f, p)


def _episode_order(name: str) -> Tuple[int, str]:
    tail = name.rsplit("_", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 62, name)


def _flat(node, h5py, n: Optional[int] = None) -> np.ndarray:
    """A dataset as [T, -1]; a group (Dict space) as its sub-arrays concatenated in sorted key order."""
    if isinstance(node, h5py.Group):
        parts = [_flat(node[k], h5py) for k in sorted(node.keys())]
        if not parts:
            raise ValueError(f"empty observation group {node.name}")
        return np.concatenate(parts, axis=1)
    a = np.asarray(node[()])
    return a.reshape(len(a), -1) if a.ndim != 1 else a.reshape(-1, 1)


def _read_minari_episodes(f, p: Path) -> Transitions:
    h5py = _import_h5py()
    names = sorted((k for k in f.keys() if k.startswith("episode_") and isinstance(f[k], h5py.Group)),
                   key=_episode_order)
    if not names:
        raise ValueError(f"{p}: no episode_* groups; not a Minari dataset file")
    obs, acts, rews, nxt, terms, truncs = [], [], [], [], [], []
    for name in names:
        ep = f[name]
        missing = [k for k in ("observations", "actions", "rewards", "terminations", "truncations") if k not in ep]
        if missing:
            raise ValueError(f"{p}: Minari episode {name!r} is missing {missing}")
        o = _flat(ep["observations"], h5py)
        a = _flat(ep["actions"], h5py)
        r = np.asarray(ep["rewards"][()]).reshape(-1)
        te = np.asarray(ep["terminations"][()]).reshape(-1)
        tr = np.asarray(ep["truncations"][()]).reshape(-1)
        t = len(a)
        if len(o) != t + 1 or not len(r) == len(te) == len(tr) == t:
            raise ValueError(f"{p}: Minari episode {name!r} has mismatched lengths: observations {len(o)} "
                             f"(expected T+1 = {t + 1}), actions {t}, rewards {len(r)}, "
                             f"terminations {len(te)}, truncations {len(tr)}")
        obs.append(o[:-1]); nxt.append(o[1:]); acts.append(a); rews.append(r); terms.append(te); truncs.append(tr)
    return {"observations": np.concatenate(obs), "actions": np.concatenate(acts),
            "rewards": np.concatenate(rews), "next_observations": np.concatenate(nxt),
            "terminals": np.concatenate(terms).astype(np.float32),
            "timeouts": np.concatenate(truncs).astype(np.float32)}


def validate_transitions(data: Mapping[str, Any], source: str = "transitions") -> Transitions:
    """Check keys, lengths and shapes; return a new dict of 2-D float32 obs/actions/next_obs and 1-D others.

    Observations and actions of any shape are flattened per row ([N, ...] -> [N, -1]); rewards,
    terminals and timeouts must have one value per row. Raises ``ValueError`` naming the problem.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a dict of arrays, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; a transition dataset needs {list(REQUIRED_KEYS)} "
                         f"(found {sorted(data)})")
    keys = list(REQUIRED_KEYS) + [k for k in OPTIONAL_KEYS if k in data]
    arrays = {k: np.asarray(data[k]) for k in keys}
    for k, v in arrays.items():
        if v.ndim == 0:
            raise ValueError(f"{source}: {k!r} is a scalar, expected one entry per transition")
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_) or np.issubdtype(v.dtype, np.complexfloating):
            raise ValueError(f"{source}: {k!r} must be real numeric, got dtype {v.dtype}")
    lengths = {k: int(v.shape[0]) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: mismatched lengths {lengths}; every key needs one entry per transition")
    n = lengths["observations"]
    if n < 2:
        raise ValueError(f"{source}: need at least 2 transitions, got {n}")
    out: Transitions = {}
    for k in ("observations", "actions", "next_observations"):
        out[k] = arrays[k].reshape(n, -1).astype(np.float32, copy=False)
    if out["observations"].shape[1] != out["next_observations"].shape[1]:
        raise ValueError(f"{source}: observations have width {out['observations'].shape[1]} but "
                         f"next_observations have width {out['next_observations'].shape[1]}")
    if out["observations"].shape[1] < 1 or out["actions"].shape[1] < 1:
        raise ValueError(f"{source}: observations and actions need at least one column")
    for k in ("rewards", "terminals") + tuple(k for k in OPTIONAL_KEYS if k in arrays):
        v = arrays[k]
        if v.size != n:
            raise ValueError(f"{source}: {k!r} must hold one value per transition, got shape {v.shape}")
        out[k] = v.reshape(n).astype(np.float32, copy=False) if k == "rewards" else v.reshape(n)
    for k in ("observations", "actions", "rewards", "next_observations"):
        _check_finite(out[k], f"{source}: {k!r}")
    for k in ("terminals",) + tuple(k for k in OPTIONAL_KEYS if k in out):
        flags = out[k]
        bad = np.flatnonzero((flags != 0) & (flags != 1))   # NaN is neither
        if bad.size:
            raise ValueError(f"{source}: {k!r} must be 0/1 (or bool); transition {bad[0]} has {flags[bad[0]]!r}")
    return out


def _check_finite(x: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` at the first NaN / inf of ``x`` (1-D or 2-D), naming its row (and column)."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        where = f"row {bad[0]}, column {bad[1]}" if x.ndim == 2 else f"transition {bad[0]}"
        raise ValueError(f"{what} has non-finite values (first at {where})")


def _coerce(source: Union[PathLike, Mapping[str, Any], np.ndarray]) -> Tuple[Union[Transitions, np.ndarray], str]:
    if isinstance(source, np.ndarray):
        return _check_array(source, "array"), "array"
    if isinstance(source, Mapping):
        return validate_transitions(source), "transitions"
    return load_source(source), str(source)


# ---------------------------------------------------------------------------------------------- rows
def to_rows(data: Mapping[str, Any], *, model_terminals: Optional[bool] = None) -> Tuple[np.ndarray, RowLayout]:
    """Flatten transitions into float32 rows ``concat(obs, action, reward, next_obs[, terminal])`` (seed A).

    ``model_terminals=None`` adds the terminal column only if some terminal equals 1 (``True`` /
    ``False`` force it). Returns ``(rows [N, D], layout)``; ``from_rows(rows, layout)`` inverts it.
    """
    d = validate_transitions(data)
    n = len(d["observations"])
    term = d["terminals"].astype(np.float32) > 0.5
    if model_terminals is None:
        model_terminals = bool(term.any())
    tdtype = d["terminals"].dtype
    layout = RowLayout(obs_dim=d["observations"].shape[1], action_dim=d["actions"].shape[1],
                       terminal=bool(model_terminals), timeouts="timeouts" in d,
                       terminal_dtype=str(tdtype if (tdtype == np.bool_ or np.issubdtype(tdtype, np.floating))
                                          else np.dtype(np.float32)))
    rows = np.empty((n, layout.dim), dtype=np.float32)
    for k, sl in layout.slices().items():
        rows[:, sl] = term.reshape(n, 1) if k == "terminals" else d[k].reshape(n, -1)
    return rows, layout


def from_rows(rows: np.ndarray, layout: RowLayout, *, timeouts: Optional[np.ndarray] = None,
              terminals: Optional[np.ndarray] = None) -> Transitions:
    """Split rows [N, D] back into ``observations``, ``actions``, ``rewards``, ``next_observations``, ``terminals``.

    Where the layout does not model terminals they come from ``terminals`` (real rows' flags), else
    are 0. ``timeouts`` is added when the layout has it (the given array, or zeros: synthetic rows
    never end an episode by time limit).
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != layout.dim:
        raise ValueError(f"rows must have shape [N, {layout.dim}] for {layout}, got {rows.shape}")
    n = rows.shape[0]
    tdt = np.dtype(layout.terminal_dtype)
    sl = layout.slices()
    out: Transitions = {k: np.ascontiguousarray(rows[:, s], dtype=np.float32)
                        for k, s in sl.items() if k != "terminals"}
    out["rewards"] = out["rewards"].reshape(n)
    if layout.terminal:
        out["terminals"] = (rows[:, sl["terminals"]].reshape(n) > 0.5).astype(tdt)
    else:
        out["terminals"] = (np.zeros(n, dtype=tdt) if terminals is None
                            else (np.asarray(terminals).reshape(n) > 0.5).astype(tdt))
    if layout.timeouts:
        out["timeouts"] = (np.zeros(n, dtype=tdt) if timeouts is None
                           else np.asarray(timeouts).reshape(n).astype(tdt))
    return {k: out[k] for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in out}


