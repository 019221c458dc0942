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

Sharded generation (``workers=N``, ``synther upsample --workers N``; ``synther_buffer.distributed``):
the model is fitted here, sent once to Ray's object store, and N Ray tasks each draw the synthetic
rows of a contiguous range of the output's chunks into a part file (``.npy``, streamed chunk by
chunk) in a temporary directory beside ``out``. This process then writes ``out`` exactly as above,
taking each chunk's synthetic rows from the parts (one chunk in memory at a time) and the real
rows of a mixture from the dataset. Chunk ``c``'s synthetic rows are drawn with a seed that depends
only on (seed, c), so the file is the same for N = 1, 2, ... and the same as in-process (given the
same ``chunk_size``, device and torch thread count, since floating-point sums depend on them). A
task whose worker or node dies is rerun by Ray; any other failure removes the parts and leaves no
``out``. Peak extra disk use: the synthetic rows once more (the parts), plus the ``.npz`` copy.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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


class _RealRows:
    """The real rows a mixture draws, chunk by chunk, without replacement until every row was used (seed E.2),
    with the flag columns the rows do not hold (``timeouts``; ``terminals`` where they are not modelled)."""

    def __init__(self, rows: np.ndarray, flags: Dict[str, np.ndarray], rng: np.random.Generator):
        self.rows, self.flags, self.rng = rows, flags, rng
        self.index = _RealIndexStream(len(rows), rng)

    def take(self, k: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """``k`` real rows and their flags."""
        idx = self.index.take(k)
        return self.rows[idx], {name: np.asarray(v)[idx] for name, v in self.flags.items()}


def chunk_plan(num_samples: int, num_real: int, chunk_size: int) -> List[Tuple[int, int, int]]:
    """The output's chunks as ``(start, end, real rows)``: real rows spread evenly over the chunks.

    Args:
        num_samples: rows in the output.
        num_real: real rows among them.
        chunk_size: rows per chunk (the last one may be shorter).

    Returns:
        One ``(start, end, r)`` per chunk; chunk ``[s, e)`` holds
        ``num_real * e // num_samples - num_real * s // num_samples`` real rows, the rest synthetic.
    """
    return [(s, min(num_samples, s + chunk_size),
             (num_real * min(num_samples, s + chunk_size)) // num_samples - (num_real * s) // num_samples)
            for s in range(0, num_samples, chunk_size)]


@dataclass(frozen=True)
class SyntheticSpec:
    """How the synthetic rows of one output chunk are drawn: the same in-process and in a Ray task.

    Attributes:
        seed: the upsample's seed; chunk ``c`` samples with :meth:`chunk_seed` ``(c)``.
        act: the action columns of a row (None for plain arrays).
        real_low, real_high: the real data's per-dimension action range (counted, not enforced).
        action_low, action_high: clip bounds for the synthetic actions (None: no clipping).
    """

    seed: int
    act: Optional[slice] = None
    real_low: Optional[np.ndarray] = None
    real_high: Optional[np.ndarray] = None
    action_low: Optional[np.ndarray] = None
    action_high: Optional[np.ndarray] = None

    def chunk_seed(self, chunk: int) -> int:
        """The sampling seed of output chunk ``chunk``: a function of (seed, chunk) only."""
        return self.seed + 1_000_003 * (chunk + 1) + 17

    def generate(self, model: TransitionDiffusion, chunk: int, n: int) -> Tuple[np.ndarray, int, int]:
        """Draw chunk ``chunk``'s ``n`` synthetic rows.

        Args:
            model: the fitted model.
            chunk: the output chunk's index (it picks the seed).
            n: synthetic rows in that chunk.

        Returns:
            ``(rows, outside, clipped)``: float32 rows [n, D] (actions clipped when bounds are set),
            the number of rows with an action outside the real range, and the number clipped.
        """
        rows = model.sample(n, seed=self.chunk_seed(chunk), progress=False)
        outside = clipped = 0
        if self.act is not None:
            a = rows[:, self.act]  # a view: clipping below writes into rows
            outside = int(((a < self.real_low) | (a > self.real_high)).any(axis=1).sum())
            if self.action_low is not None:
                clipped = int(((a < self.action_low) | (a > self.action_high)).any(axis=1).sum())
                np.clip(a, self.action_low, self.action_high, out=a)
        return rows, outside, clipped


class _InProcessSynthetic:
    """Synthetic rows for each chunk, drawn here when the writer asks for them."""

    def __init__(self, model: TransitionDiffusion, spec: SyntheticSpec):
        self.model, self.spec = model, spec
        self.outside_real = self.clipped = 0
        self.sample_seconds = 0.0

    def take(self, chunk: int, n: int) -> np.ndarray:
        t0 = time.perf_counter()
        rows, outside, clipped = self.spec.generate(self.model, chunk, n)
        self.sample_seconds += time.perf_counter() - t0
        self.outside_real += outside
        self.clipped += clipped
        return rows

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


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
             action_bounds: Optional[Tuple[Any, Any]] = None, workers: Optional[int] = None,
             ray_address: Optional[str] = None, cpus_per_worker: float = 1.0, max_retries: int = 3) -> dict:
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
        workers: None (default): generate in this process. An int N >= 1: fit here, then generate in
            N Ray tasks (``synther_buffer.distributed``; the ``distributed`` extra), each on one GPU
            when the cluster has GPUs (and ``config.device`` is not ``"cpu"``), else on
            ``cpus_per_worker`` CPUs; the parts are merged into ``out`` here. Chunk ``c``'s synthetic
            rows are drawn with the seed ``seed + 1_000_003 * (c + 1) + 17`` whichever task draws
            them, so the output is the same for every N (and the same as without ``workers``, up to
            floating-point differences between devices and thread counts).
        ray_address: the Ray cluster to use with ``workers`` (``"auto"``, ``"host:port"``,
            ``"ray://..."``); None starts a local Ray instance (and shuts it down at the end), unless
            Ray is already initialised in this process, whose cluster is then used.
        cpus_per_worker: CPUs each generation task reserves (and torch threads it uses).
        max_retries: times Ray reruns a generation task whose worker process or node died.

    Returns:
        A summary dict: counts, timings (``sample_seconds``: time spent sampling, summed over the
        tasks with ``workers``; ``generate_seconds``: wall clock of generation and writing), rates
        (``synthetic_rows_per_second`` per sampling second, ``wall_synthetic_rows_per_second``), the
        writer used and ``"compression"`` (``compression_report``); with ``workers``, ``"shards"``
        (one record per task: chunks, rows, seconds, host, node, attempt) and ``"ray"``.

    Raises:
        ValueError: bad arguments or inputs, before any training; ``config.relevance`` set
            (relevance-guided generation is for the online buffers: upsample would ignore it).
        MissingExtraError: ``workers`` without Ray installed (before any training).
    """
    t_start = time.perf_counter()
    out = Path(out)
    kind = output_kind(out)
    _check_upsample_args(num_samples, chunk_size, mix, action_bounds, workers, ray_address, cpus_per_worker,
                         max_retries)
    num_samples, mix = int(num_samples), float(mix)
    cfg = _upsample_config(config, seed, train_steps, progress)
    _check_not_the_source(source, out)
    rows, layout, real_flags, source_name = _load_rows(source, out, model, model_terminals)
    if action_bounds is not None:
        if layout is None:
            raise ValueError("action_bounds needs transition data (a plain array has no action columns)")
        action_low, action_high = check_action_bounds(*action_bounds, layout.action_dim)
    act = layout.slices()["actions"] if layout is not None else None
    n_real_data, dim = rows.shape
    out.parent.mkdir(parents=True, exist_ok=True)

    sharded = None
    if workers is not None:   # Ray first: a missing extra or an unreachable cluster fails before the fit
        from .distributed import ShardedGeneration
        sharded = ShardedGeneration(int(workers), address=ray_address, cpus_per_worker=float(cpus_per_worker),
                                    max_retries=int(max_retries), shared_dir=out.parent,
                                    device=(model.config.device if model is not None else cfg.device))
    try:
        # ---- fit (or reuse) the model
        model, fit = _fit_or_reuse(model, layout, rows, cfg)
        fit_seconds = time.perf_counter() - t_start
        model_path: Optional[Path] = None
        if save_model is not None:
            model_path = Path(save_model)
            model.save(model_path)
        compression = compression_report(n_real_data, dim, model, model_path)
        if chunk_size is None:   # one sampler batch, on the device that generates (the shards' with workers)
            on_cuda = sharded.use_gpus if sharded is not None else model.device.type == "cuda"
            chunk_size = model.config.sample_batch_size or (DEFAULT_CHUNK_SIZE if on_cuda else 16_384)
        chunk_size = int(chunk_size)

        # ---- generate and write, chunk by chunk
        num_real = int(round(mix * num_samples))
        num_synth = num_samples - num_real
        plan = chunk_plan(num_samples, num_real, chunk_size)
        spec = SyntheticSpec(seed=cfg.seed, act=act,   # the real action range: counted, not enforced
                             real_low=rows[:, act].min(axis=0) if act is not None else None,
                             real_high=rows[:, act].max(axis=0) if act is not None else None,
                             action_low=action_low if action_bounds is not None else None,
                             action_high=action_high if action_bounds is not None else None)
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        real = _RealRows(rows, real_flags, rng) if num_real else None
        attrs = {"synther_num_real": num_real, "synther_num_synthetic": num_synth, "synther_mix": mix}
        writer = _Writer(out, _output_specs(layout, kind, num_samples, dim), chunk_size, attrs=attrs)
        t_gen = time.perf_counter()
        bar = tqdm(total=num_samples, desc=f"upsample -> {out.name}", unit="row", unit_scale=True,
                   disable=not progress, dynamic_ncols=True)
        source = None
        try:   # the shards' start inside: a failure there also stops what was submitted and removes the parts
            source = _InProcessSynthetic(model, spec) if sharded is None else sharded.start(model, spec, plan, out, bar)
            for c, (start, end, r) in enumerate(plan):
                chunk, flags = _fill_chunk(c, end - start, r, dim, source, real, tuple(real_flags))
                writer.write(start, {"rows": chunk} if layout is None or kind == "npy"
                             else from_rows(chunk, layout, **flags))
                bar.update(end - start)
            source.close()
            bar.close()
            writer.finish()
        except BaseException:
            bar.close()
            try:
                if source is not None or sharded is not None:
                    (source if source is not None else sharded).abort()
            finally:
                writer.abort()
            raise
        gen_seconds = time.perf_counter() - t_gen
        summary = {
            "source": source_name, "out": str(out), "format": kind, "writer": writer.description,
            "num_samples": num_samples, "num_real": num_real, "num_synthetic": num_synth, "mix": mix,
            "chunk_size": chunk_size, "chunks": len(plan), "dataset_rows": n_real_data, "dim": dim,
            "layout": layout.to_dict() if layout is not None else None,
            "model_terminals": bool(layout.terminal) if layout is not None else False,
            "fit": fit, "fit_seconds": fit_seconds, "generate_seconds": gen_seconds,
            "sample_seconds": source.sample_seconds,
            "synthetic_rows_per_second": (num_synth / source.sample_seconds if source.sample_seconds > 0
                                          else None),
            "total_seconds": time.perf_counter() - t_start, "device": str(model.device),
            "config": model.config.to_dict(), "output_bytes": out.stat().st_size, "compression": compression,
            "action_bounds": None if action_bounds is None else [action_low.tolist(), action_high.tolist()],
            "synthetic_actions_outside_real_range": source.outside_real if act is not None else None,
            "synthetic_actions_clipped": source.clipped if action_bounds is not None else None,
            "wall_synthetic_rows_per_second": num_synth / gen_seconds if gen_seconds > 0 else None,
            "workers": None if sharded is None else int(workers),
        }
        if sharded is not None:
            summary.update(sharded.summary())
        if write_json:
            jpath = out.with_suffix(".compression.json")
            summary["json"] = str(jpath)
            _write_json(jpath, summary)
        return summary
    finally:
        if sharded is not None:
            sharded.shutdown()


def _check_upsample_args(num_samples: Any, chunk_size: Any, mix: Any, action_bounds: Any, workers: Any,
                         ray_address: Any, cpus_per_worker: Any, max_retries: Any) -> None:
    """``upsample``'s argument checks, before anything is loaded or trained (ValueError on the first bad one)."""
    def positive_int(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x >= 1

    if not positive_int(num_samples):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if chunk_size is not None and not positive_int(chunk_size):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0.0 <= float(mix) < 1.0:
        raise ValueError(f"mix must be a fraction of real rows in [0, 1), got {mix!r}")
    if action_bounds is not None and (not isinstance(action_bounds, (tuple, list)) or len(action_bounds) != 2):
        raise ValueError(f"action_bounds must be a (low, high) pair, got {action_bounds!r}")
    if workers is not None and not positive_int(workers):
        raise ValueError(f"workers must be None or a positive int, got {workers!r}")
    if ray_address is not None and workers is None:
        raise ValueError("ray_address needs workers (the number of generation tasks)")
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) or \
            not 0 < float(cpus_per_worker) < float("inf"):
        raise ValueError(f"cpus_per_worker must be a positive number, got {cpus_per_worker!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")


def _upsample_config(config: Optional[SynthERConfig], seed: Optional[int], train_steps: Optional[int],
                     progress: bool) -> SynthERConfig:
    """``config`` (default: the paper preset) with ``upsample``'s overrides; refuses ``relevance``."""
    cfg = config if config is not None else SynthERConfig.preset("paper")
    changes: Dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = int(seed)
    if train_steps is not None:
        changes["train_steps"] = int(train_steps)
    if not progress:
        changes["progress"] = False
    cfg = cfg.replace(**changes) if changes else cfg
    if cfg.relevance is not None:   # would be ignored: the model upsample fits is unconditional
        raise ValueError(
            f"config.relevance={cfg.relevance!r}: upsample does not do relevance-guided generation (Prioritized "
            "Generative Replay). It fits an unconditional diffusion model and samples without guidance, so the "
            "setting would be silently ignored. Guidance is implemented for the online buffers, which score "
            "each real row at every retrain ('curiosity' needs a dynamics model trained on the agent's data; "
            "'reward' scores are in the rows, but conditioning the offline fit and its sharded generation on "
            "them is not implemented). Upsample with relevance=None (config.replace(relevance=None)).")
    return cfg


def _check_not_the_source(source: Any, out: Path) -> None:
    """``ValueError`` when writing ``out`` would replace the dataset being read (the same file, or a file
    of a dataset directory such as Minari's)."""
    if isinstance(source, (np.ndarray, Mapping)) or not out.exists():
        return
    src = Path(source)
    same = src.exists() and (os.path.samefile(src, out) if src.is_file()
                             else out.resolve().is_relative_to(src.resolve()))
    if same:
        raise ValueError(f"the output {out} would overwrite the dataset being upsampled ({source}): write to another path")


def _load_rows(source: Any, out: Path, model: Optional[TransitionDiffusion], model_terminals: Optional[bool]
               ) -> Tuple[np.ndarray, Optional[RowLayout], Dict[str, np.ndarray], str]:
    """The real rows of ``source`` as float32 [N, D], their layout (None for a plain array), the real
    rows' flag columns the rows do not hold (``timeouts`` when the layout keeps them, ``terminals`` when
    it does not model them: a mixture's real rows keep both) and the source's name for messages."""
    data, source_name = _coerce(source)
    if isinstance(data, np.ndarray):
        if output_kind(out) != "npy":
            raise ValueError(f"a plain array input writes a .npy output (got {out.name!r})")
        rows = np.ascontiguousarray(data, dtype=np.float32)
        if not np.isfinite(rows).all():   # finite as loaded, but float64 beyond float32's range
            raise ValueError(f"{source_name}: the array has values beyond float32's range")
        return rows, None, {}, source_name
    if model is not None and model_terminals is None:  # follow the given model's layout
        model_terminals = bool(model.normalizer.terminal_dims)
    rows, layout = to_rows(data, model_terminals=model_terminals)   # validated: finite, 0/1 terminals
    flags = {"timeouts": data["timeouts"]} if layout.timeouts else {}
    if not layout.terminal:
        flags["terminals"] = data["terminals"]
    return rows, layout, flags, source_name


def _fit_or_reuse(model: Optional[TransitionDiffusion], layout: Optional[RowLayout], rows: np.ndarray,
                  cfg: SynthERConfig) -> Tuple[TransitionDiffusion, dict]:
    """A model fitted on ``rows`` now, or the given fitted ``model`` checked against them; its fit record."""
    if model is None:
        model = make_model(layout, rows.shape[1], cfg)
        return model, model.fit(rows, progress=cfg.progress)
    if model.dim != rows.shape[1]:
        raise ValueError(f"model.dim={model.dim} does not match the data's row width {rows.shape[1]}")
    if not model.fitted:
        raise ValueError("the given model is not fitted")
    return model, {**model.last_fit, "reused": True}


def _output_specs(layout: Optional[RowLayout], kind: str, num_samples: int, dim: int
                  ) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """The output's arrays (name -> shape, dtype): raw rows for ``.npy`` / plain arrays, else transition keys."""
    if layout is None or kind == "npy":
        return {"rows": ((num_samples, dim), np.dtype(np.float32))}
    tdt = np.dtype(layout.terminal_dtype)
    specs = {"observations": ((num_samples, layout.obs_dim), np.dtype(np.float32)),
             "actions": ((num_samples, layout.action_dim), np.dtype(np.float32)),
             "rewards": ((num_samples,), np.dtype(np.float32)),
             "next_observations": ((num_samples, layout.obs_dim), np.dtype(np.float32)),
             "terminals": ((num_samples,), tdt)}
    if layout.timeouts:
        specs["timeouts"] = ((num_samples,), tdt)
    return specs


def _fill_chunk(c: int, b: int, r: int, dim: int, source: Any, real: Optional["_RealRows"], flags: Sequence[str]
                ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Output chunk ``c``: ``b - r`` synthetic rows from ``source`` and ``r`` real rows, shuffled together
    when there are real ones (seed E.2); with the flag columns named in ``flags`` (real rows keep
    theirs, synthetic rows get 0: they never end an episode by time limit, and where terminals are
    not modelled no synthetic row is terminal)."""
    chunk = np.empty((b, dim), dtype=np.float32)
    out = {name: np.zeros(b, dtype=np.float32) for name in flags}
    if b - r:
        chunk[r:] = source.take(c, b - r)
    if r:
        chunk[:r], real_flags = real.take(r)
        for name in flags:
            out[name][:r] = real_flags[name]
        perm = real.rng.permutation(b)
        chunk = chunk[perm]
        out = {name: v[perm] for name, v in out.items()}
    return chunk, out


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


