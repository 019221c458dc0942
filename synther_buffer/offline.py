"""Offline SynthER: fit a dataset of transitions, upsample it to millions of rows, report compression.

Seed sections: A (transition vector, normalisation, terminals), A.1 / Table 5 (compression), C.1
(upsample each offline dataset to 5M), E.2 (50-50 real/synthetic mixtures), F (V-D4RL latents),
Figure 8 (marginal histograms, real vs synthetic).

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

Row layout (seed A): ``concat(obs, action, reward, next_obs[, terminal])``. The terminal column is
modelled only if some terminal in the data is 1 (``model_terminals=None``); otherwise it is left out
of the diffusion model and written as 0. Everything is converted to float32.

Output (``upsample``): the suffix of ``out`` picks the format. ``.npz`` and ``.hdf5``/``.h5`` write
the same keys as the input (``timeouts`` only if the input had them: real rows keep theirs,
synthetic rows get 0); ``.npy`` writes the raw rows [num_samples, D]. Rows are generated and
written ``chunk_size`` at a time, so memory holds one chunk (plus the real dataset), never the
whole output:

* HDF5: datasets of the final shape are preallocated and each chunk is written into its slice.
* ``.npz``: ``np.savez`` is a ZIP of ``.npy`` files. Each array is streamed into its own ``.npy``
  in a temporary directory beside ``out`` (a ``.npy`` header for the final shape, then each chunk's
  bytes appended in row order; C order makes row chunks contiguous), and the files are then copied
  into an uncompressed (``ZIP_STORED``, zip64) archive in 1 MiB blocks by ``zipfile``. The result
  loads with ``np.load``. Peak extra disk use is one copy of the output.
* ``.npy``: the same streamed writer, directly.
Every writer writes ``out`` + ``.tmp`` and renames it into place only when complete.

Mixtures (seed E.2): ``mix`` is the fraction of *real* rows in the output. The output has exactly
``num_samples`` rows, of which ``num_real = round(mix * num_samples)`` are real and the rest
synthetic. Real rows are taken without replacement from a random permutation of the dataset, and
the permutation is repeated (reshuffled) only when ``num_real`` exceeds the dataset size, so each
real row appears ``floor`` or ``ceil(num_real / N)`` times. With ``mix=0.5`` and ``num_samples = 2N``
the output is the whole real dataset once plus N synthetic rows, exactly the seed's 50-50 mix.
Real and synthetic rows are spread evenly over the chunks (chunk ``[s, e)`` holds
``num_real * e // num_samples - num_real * s // num_samples`` real rows) and shuffled within each
chunk, so any prefix of the file has about the requested ratio.

Compression (seed Table 5, ``compression_report``): the number of FP32s in the original data
(``N x D``, D the modelled row width) against the denoiser's trainable parameters, their ratio,
and the size of the saved model file (which also holds the EMA copy of the weights, so it is about
``2 x 4 x params`` bytes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from .config import SynthERConfig
from .diffusion import TransitionDiffusion

PathLike = Union[str, os.PathLike]
Transitions = Dict[str, np.ndarray]

REQUIRED_KEYS: Tuple[str, ...] = ("observations", "actions", "rewards", "next_observations", "terminals")
OPTIONAL_KEYS: Tuple[str, ...] = ("timeouts",)
NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".hdf5", ".h5")
NPY_SUFFIXES = (".npy",)
DEFAULT_CHUNK_SIZE = 100_000  # on CUDA, when neither chunk_size nor config.sample_batch_size is set

__all__ = [
    "REQUIRED_KEYS", "OPTIONAL_KEYS", "RowLayout", "load_transitions", "load_array", "load_source",
    "validate_transitions", "to_rows", "from_rows", "upsample", "compression_report",
    "format_compression", "report", "format_stats",
]


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class RowLayout:
    """How a transition dict maps to the columns of a flat row: ``obs | action | reward | next_obs [| terminal]``.

    Attributes:
        obs_dim: observation width.
        action_dim: action width.
        terminal: whether the row carries a terminal column (the last one).
        timeouts: whether the source dataset had a ``timeouts`` key (kept on output).
        terminal_dtype: numpy dtype name used for ``terminals`` / ``timeouts`` on output.
    """

    obs_dim: int
    action_dim: int
    terminal: bool = False
    timeouts: bool = False
    terminal_dtype: str = "float32"

    @property
    def dim(self) -> int:
        """Row width D."""
        return 2 * self.obs_dim + self.action_dim + 1 + int(self.terminal)

    @property
    def reward_col(self) -> int:
        """Index of the reward column."""
        return self.obs_dim + self.action_dim

    @property
    def terminal_col(self) -> Optional[int]:
        """Index of the terminal column, or None when terminals are not modelled."""
        return self.dim - 1 if self.terminal else None

    def slices(self) -> Dict[str, slice]:
        """Column slice of each key (``terminals`` only when modelled)."""
        o, a = self.obs_dim, self.action_dim
        out = {"observations": slice(0, o), "actions": slice(o, o + a), "rewards": slice(o + a, o + a + 1),
               "next_observations": slice(o + a + 1, 2 * o + a + 1)}
        if self.terminal:
            out["terminals"] = slice(2 * o + a + 1, 2 * o + a + 2)
        return out

    def column_names(self) -> List[str]:
        """One name per row column: ``obs_0 .. action_0 .. reward next_obs_0 .. [terminal]``."""
        names = [f"obs_{i}" for i in range(self.obs_dim)] + [f"action_{i}" for i in range(self.action_dim)]
        names += ["reward"] + [f"next_obs_{i}" for i in range(self.obs_dim)]
        return names + (["terminal"] if self.terminal else [])

    def to_dict(self) -> dict:
        """Plain-python dict (JSON friendly)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- loading
def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _import_h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("reading/writing HDF5 (D4RL or Minari) needs h5py: pip install h5py") from None
    return h5py


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
        except (zipfile.BadZipFile, OSError, ValueError) as e:
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
    except (OSError, ValueError) as e:
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
    return x


def _require_keys(data: Mapping[str, Any], available: Sequence[str], source: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}; a transition dataset needs {list(REQUIRED_KEYS)} "
                         f"(found {sorted(available)})")


def _load_hdf5(p: Path) -> Transitions:
    h5py = _import_h5py()
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"could not open {p} as HDF5: {e}") from None
    with f:
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
    h5py = _import_h5py()
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"could not open {p} as HDF5: {e}") from None
    with f:
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
    return out


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


def from_rows(rows: np.ndarray, layout: RowLayout, *, timeouts: Optional[np.ndarray] = None) -> Transitions:
    """Split rows [N, D] back into ``observations``, ``actions``, ``rewards``, ``next_observations``, ``terminals``.

    Terminals are 0 when the layout does not model them. ``timeouts`` is added when the layout has
    it (the given array, or zeros: synthetic rows never end an episode by time limit).
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
    out["terminals"] = ((rows[:, sl["terminals"]].reshape(n) > 0.5) if layout.terminal
                        else np.zeros(n, dtype=bool)).astype(tdt)
    if layout.timeouts:
        out["timeouts"] = (np.zeros(n, dtype=tdt) if timeouts is None
                           else np.asarray(timeouts).reshape(n).astype(tdt))
    return {k: out[k] for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in out}


# ---------------------------------------------------------------------------------------------- writers
class _NpyStream:
    """Writes a C-order ``.npy`` of a known final shape by appending row chunks (no memmap, no full copy)."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self.f = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        try:
            np.lib.format.write_array_header_1_0(self.f, header)
        except ValueError:  # header over 64 KiB: never for our shapes, but keep the format valid
            np.lib.format.write_array_header_2_0(self.f, header)

    def write(self, start: int, chunk: np.ndarray) -> None:
        if start != self.rows:
            raise RuntimeError(f"{self.path.name}: chunks must be written in order (at {self.rows}, got {start})")
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise RuntimeError(f"{self.path.name}: chunk shape {chunk.shape} does not fit {self.shape}")
        self.f.write(chunk.tobytes())
        self.rows += len(chunk)

    def close(self) -> None:
        self.f.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path.name}: wrote {self.rows} of {self.shape[0]} rows")


class _Writer:
    """Streams named arrays of known final shapes to ``out`` (npz / hdf5 / npy), chunk by chunk.

    Writes ``out`` + ``.tmp`` (and, for npz, per-array ``.npy`` files in a temp dir beside ``out``),
    then renames into place on ``finish``; ``abort`` removes the partial files.
    """

    def __init__(self, out: Path, specs: Mapping[str, Tuple[Tuple[int, ...], np.dtype]], chunk_rows: int,
                 attrs: Optional[Mapping[str, Any]] = None):
        self.out = out
        self.kind = output_kind(out)
        self.tmp = out.with_name(out.name + ".tmp")
        self.tmpdir: Optional[Path] = None
        self.streams: Dict[str, _NpyStream] = {}
        self.h5 = None
        if self.kind == "npy":
            if list(specs) != ["rows"]:
                raise ValueError("a .npy output holds one array")
            shape, dtype = specs["rows"]
            self.streams["rows"] = _NpyStream(self.tmp, shape, dtype)
        elif self.kind == "npz":
            self.tmpdir = Path(tempfile.mkdtemp(prefix=".synther-npz-", dir=out.parent))
            for k, (shape, dtype) in specs.items():
                self.streams[k] = _NpyStream(self.tmpdir / f"{k}.npy", shape, dtype)
        else:
            h5py = _import_h5py()
            self.h5 = h5py.File(self.tmp, "w")
            for k, (shape, dtype) in specs.items():
                chunks = (max(1, min(chunk_rows, shape[0], 65_536)),) + tuple(shape[1:]) if shape[0] else None
                self.h5.create_dataset(k, shape=shape, dtype=dtype, chunks=chunks)
            for k, v in (attrs or {}).items():
                self.h5.attrs[k] = v

    @property
    def description(self) -> str:
        return {"npy": "streamed .npy (header + appended row chunks)",
                "npz": "streamed per-array .npy files in a temp dir, zipped (ZIP_STORED, zip64) into .npz",
                "hdf5": "h5py datasets preallocated at full shape, filled chunk by chunk"}[self.kind]

    def write(self, start: int, arrays: Mapping[str, np.ndarray]) -> None:
        if self.h5 is not None:
            for k, v in arrays.items():
                self.h5[k][start:start + len(v)] = v
        else:
            for k, v in arrays.items():
                self.streams[k].write(start, v)

    def finish(self) -> None:
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None
        else:
            for s in self.streams.values():
                s.close()
            if self.kind == "npz":
                with zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for k, s in self.streams.items():
                        zf.write(s.path, arcname=f"{k}.npy")  # copies in blocks, never loads the file
        os.replace(self.tmp, self.out)
        self._cleanup()

    def abort(self) -> None:
        try:
            if self.h5 is not None:
                self.h5.close()
            for s in self.streams.values():
                if not s.f.closed:
                    s.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            self._cleanup()

    def _cleanup(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def output_kind(out: PathLike) -> str:
    """``"npz"``, ``"hdf5"`` or ``"npy"`` from the suffix of ``out``; ``ValueError`` for anything else."""
    suf = _suffix(Path(out))
    if suf in NPZ_SUFFIXES:
        return "npz"
    if suf in HDF5_SUFFIXES:
        return "hdf5"
    if suf in NPY_SUFFIXES:
        return "npy"
    raise ValueError(f"unknown output type {Path(out).name!r}: use .npz, .hdf5/.h5 or .npy")


class _RealIndexStream:
    """Indices into N real rows: successive random permutations, so rows repeat only after all were used."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.perm = rng.permutation(n)
        self.pos = 0

    def take(self, k: int) -> np.ndarray:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = self.rng.permutation(self.n), 0
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + m])
            self.pos += m
            k -= m
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- upsample
def make_model(layout: Optional[RowLayout], dim: int, config: SynthERConfig) -> TransitionDiffusion:
    """A fresh ``TransitionDiffusion`` for rows of ``layout`` (terminal column raw; reward skipped if
    ``config.normalize_reward`` is False), or for a plain [N, dim] array when ``layout`` is None."""
    if layout is None:
        return TransitionDiffusion(dim, config)
    return TransitionDiffusion(layout.dim, config,
                               terminal_dims=[layout.terminal_col] if layout.terminal else [],
                               skip_dims=[] if config.normalize_reward else [layout.reward_col])


def upsample(source: Union[PathLike, Mapping[str, Any], np.ndarray], out: PathLike, *,
             num_samples: int = 5_000_000, config: Optional[SynthERConfig] = None, mix: float = 0.0,
             seed: Optional[int] = None, train_steps: Optional[int] = None,
             save_model: Optional[PathLike] = None, model: Optional[TransitionDiffusion] = None,
             model_terminals: Optional[bool] = None, chunk_size: Optional[int] = None,
             progress: bool = True, write_json: bool = True) -> dict:
    """Fit SynthER on a dataset and write ``num_samples`` rows to ``out``, streaming chunk by chunk (seed C.1).

    Args:
        source: a path (see ``load_source``), a transition dict, or a plain float array [N, D].
        out: output path; ``.npz`` / ``.hdf5`` / ``.h5`` (transition keys) or ``.npy`` (raw rows).
        num_samples: rows in the output (synthetic plus real when ``mix`` > 0).
        config: diffusion hyperparameters (default ``SynthERConfig.preset("paper")``).
        mix: fraction of real rows in [0, 1); ``round(mix * num_samples)`` rows are real (seed E.2).
        seed: overrides ``config.seed`` (weights, training batches, sampling noise, mixing).
        train_steps: overrides ``config.train_steps``.
        save_model: where to save the fitted model (``TransitionDiffusion.save``).
        model: an already fitted model to sample from instead of fitting one (its ``dim`` must match).
        model_terminals: see ``to_rows`` (None: only if some terminal is 1, or as ``model`` does).
        chunk_size: rows generated and written per step (the memory bound, and the progress bar's
            unit); None = the model's sampling batch (``config.sample_batch_size``, else 100K on
            CUDA / 16K on CPU), so each chunk is one sampler batch.
        progress: tqdm bars for the fit and over the chunks (with ETA).
        write_json: also write the returned summary to ``out`` with suffix ``.compression.json``.

    Returns a summary dict: counts, timings, the writer used and ``"compression"``
    (``compression_report``). Raises ``ValueError`` for bad arguments or inputs before any training.
    """
    t_start = time.perf_counter()
    out = Path(out)
    kind = output_kind(out)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0.0 <= float(mix) < 1.0:
        raise ValueError(f"mix must be a fraction of real rows in [0, 1), got {mix!r}")
    num_samples, mix = int(num_samples), float(mix)
    cfg = config if config is not None else SynthERConfig.preset("paper")
    changes: Dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = int(seed)
    if train_steps is not None:
        changes["train_steps"] = int(train_steps)
    if not progress:
        changes["progress"] = False
    cfg = cfg.replace(**changes) if changes else cfg

    data, source_name = _coerce(source)
    if isinstance(data, np.ndarray):
        rows, layout = np.ascontiguousarray(data, dtype=np.float32), None
        if kind != "npy":
            raise ValueError(f"a plain array input writes a .npy output (got {out.name!r})")
        if not np.isfinite(rows).all():
            raise ValueError(f"{source_name}: the array has non-finite values")
        real_timeouts = None
    else:
        if model is not None and model_terminals is None:  # follow the given model's layout
            model_terminals = bool(model.normalizer.terminal_dims)
        rows, layout = to_rows(data, model_terminals=model_terminals)
        if not np.isfinite(rows).all():
            bad = np.argwhere(~np.isfinite(rows))[0]
            raise ValueError(f"{source_name}: non-finite value in column {layout.column_names()[bad[1]]} "
                             f"of transition {bad[0]}")
        real_timeouts = data.get("timeouts") if layout.timeouts else None
        del data
    n_real_data, dim = rows.shape
    out.parent.mkdir(parents=True, exist_ok=True)

    # ---- fit (or reuse) the model
    if model is None:
        model = make_model(layout, dim, cfg)
        fit = model.fit(rows, progress=cfg.progress)
    else:
        if model.dim != dim:
            raise ValueError(f"model.dim={model.dim} does not match the data's row width {dim}")
        if not model.fitted:
            raise ValueError("the given model is not fitted")
        fit = dict(model.last_fit)
        fit["reused"] = True
    fit_seconds = time.perf_counter() - t_start
    model_path: Optional[Path] = None
    if save_model is not None:
        model_path = Path(save_model)
        model.save(model_path)
    compression = compression_report(n_real_data, dim, model, model_path)
    if chunk_size is None:
        chunk_size = model.config.sample_batch_size or (
            DEFAULT_CHUNK_SIZE if model.device.type == "cuda" else 16_384)
    chunk_size = int(chunk_size)

    # ---- generate and write, chunk by chunk
    num_real = int(round(mix * num_samples))
    num_synth = num_samples - num_real
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    real_stream = _RealIndexStream(n_real_data, rng) if num_real else None
    if layout is None:
        specs = {"rows": ((num_samples, dim), np.dtype(np.float32))}
    elif kind == "npy":
        specs = {"rows": ((num_samples, dim), np.dtype(np.float32))}
    else:
        tdt = np.dtype(layout.terminal_dtype)
        specs = {"observations": ((num_samples, layout.obs_dim), np.dtype(np.float32)),
                 "actions": ((num_samples, layout.action_dim), np.dtype(np.float32)),
                 "rewards": ((num_samples,), np.dtype(np.float32)),
                 "next_observations": ((num_samples, layout.obs_dim), np.dtype(np.float32)),
                 "terminals": ((num_samples,), tdt)}
        if layout.timeouts:
            specs["timeouts"] = ((num_samples,), tdt)
    attrs = {"synther_num_real": num_real, "synther_num_synthetic": num_synth, "synther_mix": mix}
    writer = _Writer(out, specs, chunk_size, attrs=attrs)
    t_gen = time.perf_counter()
    chunks = 0
    sample_seconds = 0.0
    bar = tqdm(total=num_samples, desc=f"upsample -> {out.name}", unit="row", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, num_samples, chunk_size):
            end = min(num_samples, start + chunk_size)
            b = end - start
            r = (num_real * end) // num_samples - (num_real * start) // num_samples
            chunk = np.empty((b, dim), dtype=np.float32)
            timeouts = np.zeros(b, dtype=np.float32) if real_timeouts is not None else None
            if b - r:
                t0 = time.perf_counter()
                chunk[r:] = model.sample(b - r, seed=cfg.seed + 1_000_003 * (chunks + 1) + 17, progress=False)
                sample_seconds += time.perf_counter() - t0
            if r:
                idx = real_stream.take(r)
                chunk[:r] = rows[idx]
                if timeouts is not None:
                    timeouts[:r] = np.asarray(real_timeouts)[idx]
                perm = rng.permutation(b)
                chunk = chunk[perm]
                if timeouts is not None:
                    timeouts = timeouts[perm]
            if layout is None or kind == "npy":
                writer.write(start, {"rows": chunk})
            else:
                writer.write(start, from_rows(chunk, layout, timeouts=timeouts))
            chunks += 1
            bar.update(b)
        bar.close()
        writer.finish()
    except BaseException:
        bar.close()
        writer.abort()
        raise
    gen_seconds = time.perf_counter() - t_gen
    total = time.perf_counter() - t_start

    summary = {
        "source": source_name, "out": str(out), "format": kind, "writer": writer.description,
        "num_samples": num_samples, "num_real": num_real, "num_synthetic": num_synth, "mix": mix,
        "chunk_size": chunk_size, "chunks": chunks, "dataset_rows": n_real_data, "dim": dim,
        "layout": layout.to_dict() if layout is not None else None,
        "model_terminals": bool(layout.terminal) if layout is not None else False,
        "fit": fit, "fit_seconds": fit_seconds, "generate_seconds": gen_seconds,
        "sample_seconds": sample_seconds,
        "synthetic_rows_per_second": num_synth / sample_seconds if sample_seconds > 0 else None,
        "total_seconds": total, "device": str(model.device), "config": model.config.to_dict(),
        "output_bytes": out.stat().st_size, "compression": compression,
    }
    if write_json:
        jpath = out.with_suffix(".compression.json")
        summary["json"] = str(jpath)
        _write_json(jpath, summary)
    return summary


# ---------------------------------------------------------------------------------------------- compression
def compression_report(num_rows: int, dim: int, model: TransitionDiffusion,
                       model_path: Optional[PathLike] = None) -> dict:
    """Seed Table 5: FP32s in the original data (``num_rows x dim``) vs the denoiser's parameters.

    ``model_path``: the saved model file to measure; when None the model is saved to a temporary
    file just to measure its size. Returns ``original_floats``, ``diffusion_params``,
    ``compression`` (= original_floats / diffusion_params), ``original_bytes`` (4 bytes per float),
    ``model_file_bytes``, ``file_compression`` (= original_bytes / model_file_bytes) and the inputs.
    """
    num_rows, dim = int(num_rows), int(dim)
    if num_rows < 1 or dim < 1:
        raise ValueError(f"num_rows and dim must be positive, got {num_rows}, {dim}")
    params = int(model.num_params)
    if model_path is not None and Path(model_path).is_file():
        size = Path(model_path).stat().st_size
        where = str(model_path)
    else:
        with tempfile.TemporaryDirectory(prefix="synther-size-") as d:
            p = Path(d) / "model.pt"
            model.save(p)
            size = p.stat().st_size
        where = None
    floats = num_rows * dim
    return {"num_rows": num_rows, "dim": dim, "original_floats": floats, "diffusion_params": params,
            "compression": floats / params, "original_bytes": 4 * floats, "model_file": where,
            "model_file_bytes": int(size), "file_compression": 4 * floats / size}


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}"


def format_compression(c: Mapping[str, Any]) -> str:
    """Human-readable Table 5 line(s) for a ``compression_report`` dict."""
    mb = 1024 ** 2
    lines = [
        "compression (seed Table 5)",
        f"  original data     {c['num_rows']:,} rows x {c['dim']} dims = {_human(c['original_floats'])} FP32s "
        f"({c['original_bytes'] / mb:.1f} MiB)",
        f"  diffusion params  {_human(c['diffusion_params'])} ({c['diffusion_params']:,})",
        f"  compression       {c['compression']:.1f}x (FP32s / parameters)",
        f"  model file        {c['model_file_bytes'] / mb:.1f} MiB"
        + (f" at {c['model_file']}" if c.get("model_file") else " (measured in a temp file; use --save-model to keep it)")
        + f" -> {c['file_compression']:.1f}x on disk (the file holds weights + EMA copy)",
    ]
    return "\n".join(lines)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------- report
def _columns(data: Union[Transitions, np.ndarray]) -> Tuple[np.ndarray, List[str], Optional[np.ndarray], List[str]]:
    """(rows without terminal, column names, terminals or None, names of the columns to histogram)."""
    if isinstance(data, np.ndarray):
        names = [f"dim_{i}" for i in range(data.shape[1])]
        return np.asarray(data, dtype=np.float32), names, None, names
    rows, layout = to_rows(data, model_terminals=False)
    names = layout.column_names()
    hist = names[:layout.obs_dim + layout.action_dim + 1]  # Figure 8: state, action, reward
    return rows, names, (np.asarray(data["terminals"]).astype(np.float32) > 0.5), hist


def _col_stats(x: np.ndarray, block: int = 262_144) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std per column in float64, in row blocks (no full float64 copy)."""
    n = x.shape[0]
    shift = x[: min(n, 1024)].astype(np.float64).mean(axis=0)
    s = np.zeros(x.shape[1]); s2 = np.zeros(x.shape[1])
    for i in range(0, n, block):
        d = x[i:i + block].astype(np.float64) - shift
        s += d.sum(axis=0)
        s2 += np.square(d).sum(axis=0)
    m = s / n
    return shift + m, np.sqrt(np.maximum(s2 / n - m * m, 0.0))


def report(real: Union[PathLike, Mapping[str, Any], np.ndarray], synthetic: Union[PathLike, Mapping[str, Any], np.ndarray],
           *, out_png: Optional[PathLike] = None, out_json: Optional[PathLike] = None,
           env_id: Optional[str] = None, max_hist_rows: int = 200_000, bins: int = 50,
           max_panels: int = 120, seed: int = 0) -> dict:
    """Compare a synthetic dataset with the real one: marginal histograms, mean/std table, terminal rate.

    Args:
        real, synthetic: paths (see ``load_source``), transition dicts or plain arrays, of the same width.
        out_png: histogram grid (seed Figure 8 style: synthetic blue, real orange, dashed real mean
            +- std) over the observation, action and reward columns (all columns for plain arrays),
            at most ``max_panels`` panels, from at most ``max_hist_rows`` random rows of each set.
        out_json: where to write the returned dict (default: ``out_png`` with suffix ``.json``).
        env_id: if given and ``benchmarks.fidelity.score_transitions(env_id, rows_dict)`` is importable,
            its result is stored under ``"fidelity"``; otherwise ``"fidelity"`` is None and
            ``"fidelity_note"`` says the benchmark module is needed.

    Returns ``{"num_real", "num_synthetic", "columns": [{name, real_mean, real_std, synthetic_mean,
    synthetic_std, mean_diff_in_std, std_ratio}], "terminal_rate": {...}, "summary": {...}, ...}``.
    """
    r_data, r_name = _coerce(real)
    s_data, s_name = _coerce(synthetic)
    r_rows, names, r_term, hist_names = _columns(r_data)
    s_rows, s_names, s_term, _ = _columns(s_data)
    if r_rows.shape[1] != s_rows.shape[1]:
        raise ValueError(f"real rows have {r_rows.shape[1]} columns but synthetic rows have {s_rows.shape[1]}")
    if isinstance(r_data, np.ndarray) and not isinstance(s_data, np.ndarray):
        names, hist_names = s_names, _columns(s_data)[3]

    rm, rs = _col_stats(r_rows)
    sm, ss = _col_stats(s_rows)
    safe = np.where(rs > 1e-12, rs, 1.0)
    columns = [{"name": n, "real_mean": float(rm[i]), "real_std": float(rs[i]), "synthetic_mean": float(sm[i]),
                "synthetic_std": float(ss[i]), "mean_diff_in_std": float(abs(sm[i] - rm[i]) / safe[i]),
                "std_ratio": float(ss[i] / rs[i]) if rs[i] > 1e-12 else None} for i, n in enumerate(names)]
    diffs = np.array([c["mean_diff_in_std"] for c in columns])
    ratios = np.array([c["std_ratio"] for c in columns if c["std_ratio"] is not None])
    result: Dict[str, Any] = {
        "real": r_name, "synthetic": s_name, "num_real": int(r_rows.shape[0]), "num_synthetic": int(s_rows.shape[0]),
        "columns": columns,
        "terminal_rate": {"real": float(r_term.mean()) if r_term is not None else None,
                          "synthetic": float(s_term.mean()) if s_term is not None else None},
        "summary": {"max_mean_diff_in_std": float(diffs.max()), "mean_mean_diff_in_std": float(diffs.mean()),
                    "median_std_ratio": float(np.median(ratios)) if ratios.size else None},
        "fidelity": None,
    }

    if env_id is not None:
        result["env_id"] = env_id
        if isinstance(s_data, np.ndarray):
            result["fidelity_note"] = "fidelity scoring needs a transition dataset, not a plain array"
        else:
            try:
                from benchmarks.fidelity import score_transitions  # optional, outside synther_buffer
            except ImportError as e:
                result["fidelity_note"] = (f"fidelity scoring for --env-id needs the benchmark module "
                                           f"benchmarks.fidelity (score_transitions), which is not importable "
                                           f"({type(e).__name__}: {e}); skipped")
            else:
                reference = None if isinstance(r_data, np.ndarray) else dict(r_data)
                try:  # normalise errors by the real data's stds where we have them
                    result["fidelity"] = score_transitions(env_id, dict(s_data), reference=reference)
                except ValueError as e:  # unsupported env, width mismatch: keep the rest of the report
                    result["fidelity_note"] = f"fidelity scoring skipped: {e}"

    if out_png is not None:
        out_png = Path(out_png)
        rng = np.random.default_rng(seed)
        cols = [names.index(n) for n in hist_names][:max_panels]
        result["histogram_columns"] = [names[i] for i in cols]
        if len(hist_names) > max_panels:
            result["histogram_note"] = f"plotted the first {max_panels} of {len(hist_names)} columns"
        _plot_histograms(out_png, _subsample(r_rows, max_hist_rows, rng)[:, cols],
                         _subsample(s_rows, max_hist_rows, rng)[:, cols], [names[i] for i in cols],
                         rm[cols], rs[cols], bins)
        result["png"] = str(out_png)
        if out_json is None:
            out_json = out_png.with_suffix(".json")
    if out_json is not None:
        result["json"] = str(out_json)
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(out_json), result)
    return result


def _subsample(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= k:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=k, replace=False))]


def _plot_histograms(path: Path, real: np.ndarray, synth: np.ndarray, names: Sequence[str],
                     mean: np.ndarray, std: np.ndarray, bins: int) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(names)
    ncols = min(8, max(1, math.ceil(math.sqrt(k))))
    nrows = max(1, math.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        lo = float(min(np.percentile(real[:, i], 0.5), np.percentile(synth[:, i], 0.5)))
        hi = float(max(np.percentile(real[:, i], 99.5), np.percentile(synth[:, i], 99.5)))
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(synth[:, i], bins=edges, density=True, alpha=0.6, color="tab:blue", label="synthetic")
        ax.hist(real[:, i], bins=edges, density=True, alpha=0.6, color="tab:orange", label="real")
        for v in (mean[i] - std[i], mean[i] + std[i]):
            ax.axvline(v, color="k", linestyle="--", linewidth=0.8)
        ax.set_title(names[i], fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle("marginals: synthetic (blue) vs real (orange); dashed: real mean +- std", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_stats(result: Mapping[str, Any], max_rows: int = 60) -> str:
    """A printable mean/std table (and terminal rate) for a ``report`` result."""
    lines = [f"{'column':<14}{'real mean':>11}{'real std':>10}{'synth mean':>12}{'synth std':>11}{'|dmean|/std':>12}"]
    cols = result["columns"]
    for c in cols[:max_rows]:
        lines.append(f"{c['name']:<14}{c['real_mean']:>11.4g}{c['real_std']:>10.4g}{c['synthetic_mean']:>12.4g}"
                     f"{c['synthetic_std']:>11.4g}{c['mean_diff_in_std']:>12.3f}")
    if len(cols) > max_rows:
        lines.append(f"... {len(cols) - max_rows} more columns in the JSON")
    tr = result["terminal_rate"]
    if tr["real"] is not None or tr["synthetic"] is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.6f}"
        lines.append(f"terminal rate: real {fmt(tr['real'])}, synthetic {fmt(tr['synthetic'])}")
    s = result["summary"]
    lines.append(f"rows: real {result['num_real']:,}, synthetic {result['num_synthetic']:,}; "
                 f"max |dmean|/std {s['max_mean_diff_in_std']:.3f}, mean {s['mean_mean_diff_in_std']:.3f}"
                 + (f", median std ratio {s['median_std_ratio']:.3f}" if s["median_std_ratio"] is not None else ""))
    return "\n".join(lines)
