"""Checkpoint files of the framework-free buffers (``GenerativeReplay``, ``WrappedReplay``).

A checkpoint is a directory holding ``state.pt`` (plain python and CPU tensors, loadable with
``torch.load(weights_only=True)``) and any numpy arrays the buffer adds (``real.npy`` for
``GenerativeReplay``). It is written into a temporary sibling and swapped in whole
(``synther_buffer.checkpoint.atomic_directory``). What every buffer saves the same way lives here:
the widths, ``model_terminals``, the config, the batch device and the ``MixingCore`` state.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from .checkpoint import atomic_directory, resolve_directory
from .config import SynthERConfig
from .diffusion import available_device

CHECKPOINT_VERSION = 1
PathLike = Union[str, os.PathLike]


def core_state(buf, kind: str) -> dict:
    """What every buffer checkpoint holds: its kind, widths, settings, batch device and core state.

    Args:
        buf: a buffer built on a ``MixingCore`` (``buf.core``) with ``obs_dim``, ``action_dim`` and
            ``device`` (the batch device, or None).
        kind: the class name, checked at load.

    Returns:
        A ``weights_only``-safe dict.
    """
    return {"version": CHECKPOINT_VERSION, "kind": kind, "obs_dim": buf.obs_dim, "action_dim": buf.action_dim,
            "model_terminals": buf.model_terminals, "config": buf.config.to_dict(),
            "batch_device": None if buf.device is None else str(buf.device), **buf.core.state_dict()}


def write(path: PathLike, state: dict, arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write ``state`` (``state.pt``) and ``arrays`` (``<name>.npy``) to directory ``path``, atomically."""
    with atomic_directory(path) as tmp:
        for name, arr in (arrays or {}).items():
            np.save(tmp / f"{name}.npy", arr)
        torch.save(state, tmp / "state.pt")


def read(path: PathLike, kind: str, arrays: Tuple[str, ...] = ()) -> Tuple[Path, dict, Dict[str, np.ndarray]]:
    """Read a checkpoint written by ``write`` for a buffer of class ``kind``.

    Args:
        path: the directory (``path.old`` is used after a kill between the swap's renames).
        kind: the class that must have written it (checkpoints without a kind are ``GenerativeReplay``'s).
        arrays: the ``.npy`` files to read.

    Returns:
        ``(directory, state, {name: array})``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: unreadable files, another version, or another buffer's checkpoint.
    """
    path = resolve_directory(path) or Path(path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path} is not a {kind} checkpoint of version {CHECKPOINT_VERSION}")
        saved_kind = state.get("kind", "GenerativeReplay")
        if saved_kind != kind:
            raise ValueError(f"{path} is a {saved_kind} checkpoint, not a {kind} one: load it with {saved_kind}.load")
        loaded = {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in arrays}
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:
        raise ValueError(f"could not load {kind} checkpoint {path}: {type(e).__name__}: {e}") from None
    return path, state, loaded


def saved_config(state: dict, device: Optional[str]) -> SynthERConfig:
    """The saved config, with the model's device replaced by ``device`` when given (else the saved one, or
    the CPU with a warning when that names CUDA and there is none here)."""
    cfg = SynthERConfig.from_dict(state["config"])
    return cfg.replace(device=device if device is not None else available_device(cfg.device, "buffer checkpoint"))


@contextmanager
def restoring(kind: str, path: Path) -> Iterator[None]:
    """Turn what a damaged ``state.pt`` raises while a buffer is rebuilt into one ``ValueError``."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError) as e:
        raise ValueError(f"corrupt {kind} checkpoint {path}: {type(e).__name__}: {e}") from None


def restore_core(buf, state: dict) -> None:
    """Restore what ``core_state`` saved into a freshly built ``buf``: the core and the batch device.

    Checkpoints written before batches had their own device put them on the model's device; so
    does a buffer loaded from one.
    """
    buf.core.load_state_dict(state["pool"], state.get("terminal_column"))
    device = state["batch_device"] if "batch_device" in state else buf.core.pool.device
    try:
        buf.device = device
    except ValueError as e:  # saved on a CUDA machine, loaded on one without
        warnings.warn(f"batches were saved to go to {device!r}, which is not available here ({e}); they go to "
                      f"the CPU: set buf.device to change it", stacklevel=3)
        buf.device = "cpu"
