"""
Seed sections: A (transition vector, normalisation, terminals), A.1 / Table 5 (compression), C.1
(upsample each offline dataset to 5M), E.2 (50-50 real/synthetic mixtures), F (V-D4RL latents),
Figure 8 (marginal histograms, real vs synthetic).

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

Actions: synthetic actions are written as generated (the paper's offline data), and can leave the
real data's range (31% of rows in a HalfCheetah test, README). ``action_bounds=(low, high)`` clips
the synthetic rows' action columns (e.g. ``(-1, 1)`` for D4RL / Minari MuJoCo, where a tanh-squashed policy gives an action on
or outside the bound an infinite negative log-likelihood). Either way the summary counts the
synthetic rows with an action outside the real data's per-dimension range, and, with bounds, those
clipped.

Compression (seed Table 5, ``compression_report``): the number of FP32s in the original data
(``N x D``, D the modelled row width) against the denoiser's trainable parameters, their ratio,
and the size of the saved model file (which also holds the EMA copy of the weights, so it is about
``2 x 4 x params`` bytes).

Dataset loading lives in ``synther_buffer.datasets``; the comparison report in ``synther_buffer.report``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from .config import SynthERConfig
from .datasets import (HDF5_SUFFIXES, NPY_SUFFIXES, NPZ_SUFFIXES, PathLike, RowLayout, _coerce, _import_h5py,
                       _suffix, from_rows, to_rows)
from .diffusion import TransitionDiffusion
from .pool import check_action_bounds, model_for

DEFAULT_CHUNK_SIZE = 100_000  # on CUDA, when neither chunk_size nor config.sample_batch_size is set


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
    """A fresh ``TransitionDiffusion`` for rows of ``layout`` (see ``synther_buffer.pool.model_for``),
    or for a plain [N, dim] array when ``layout`` is None."""
    if layout is None:
        return TransitionDiffusion(dim, config)
    return model_for(layout, config)


def upsample(source: Union[PathLike, Mapping[str, Any], np.ndarray], out: PathLike, *,
             num_samples: int = 5_000_000, config: Optional[SynthERConfig] = None, mix: float = 0.0,
             seed: Optional[int] = None, train_steps: Optional[int] = None,
             save_model: Optional[PathLike] = None, model: Optional[TransitionDiffusion] = None,
             model_terminals: Optional[bool] = None, chunk_size: Optional[int] = None,
             progress: bool = True, write_json: bool = True,
             action_bounds: Optional[Tuple[Any, Any]] = None) -> dict:
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
        action_bounds: ``(low, high)``, scalars or one value per action dimension: the synthetic
            rows' actions are clipped to them (real rows are written as they are). Transition data
            only. None (default): actions as generated.

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
    if action_bounds is not None and (not isinstance(action_bounds, (tuple, list)) or len(action_bounds) != 2):
        raise ValueError(f"action_bounds must be a (low, high) pair, got {action_bounds!r}")
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
        if not np.isfinite(rows).all():   # finite as loaded, but float64 beyond float32's range
            raise ValueError(f"{source_name}: the array has values beyond float32's range")
        real_timeouts = None
    else:
        if model is not None and model_terminals is None:  # follow the given model's layout
            model_terminals = bool(model.normalizer.terminal_dims)
        rows, layout = to_rows(data, model_terminals=model_terminals)   # validated: finite, 0/1 terminals
        real_timeouts = data.get("timeouts") if layout.timeouts else None
        del data
    if action_bounds is not None:
        if layout is None:
            raise ValueError("action_bounds needs transition data (a plain array has no action columns)")
        action_low, action_high = check_action_bounds(*action_bounds, layout.action_dim)
    act = layout.slices()["actions"] if layout is not None else None
    if act is not None:  # the real data's action range, for the summary's count of synthetic rows outside it
        real_low, real_high = rows[:, act].min(axis=0), rows[:, act].max(axis=0)
    outside_real = clipped = 0
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
                if act is not None:
                    a = chunk[r:, act]  # a view: clipping below writes into the chunk
                    outside_real += int(((a < real_low) | (a > real_high)).any(axis=1).sum())
                    if action_bounds is not None:
                        clipped += int(((a < action_low) | (a > action_high)).any(axis=1).sum())
                        np.clip(a, action_low, action_high, out=a)
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
        "action_bounds": None if action_bounds is None else [action_low.tolist(), action_high.tolist()],
        "synthetic_actions_outside_real_range": outside_real if act is not None else None,
        "synthetic_actions_clipped": clipped if action_bounds is not None else None,
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
        json.dump(obj, f, indent=2, default=json_default)
        f.write("\n")
    os.replace(tmp, path)


def json_default(o: Any) -> Any:
    """``json.dump(default=...)`` for numpy scalars/arrays and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


