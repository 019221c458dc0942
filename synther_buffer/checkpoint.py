"""Training-run checkpoints: a directory swapped in whole or not at all, plus the process RNG states.

Framework-free (stdlib, numpy, torch). Used by ``GenerativeReplay.save`` and by the integration scripts'
``--checkpoint-every`` / ``--resume``:

* :func:`atomic_directory` -- write a directory's files into a temporary sibling, then swap it in, so
  a kill at any moment leaves either the previous complete checkpoint or the new one;
  :func:`resolve_directory` finds it again (also after a kill between the swap's two renames).
* :func:`write_weights_only` / :func:`read_weights_only` -- a directory of ``torch.save`` files that
  load with ``torch.load(weights_only=True)`` (no code runs on load), swapped in atomically.
* :func:`rng_state` / :func:`set_rng_state` -- Python ``random``, numpy's global RNG and torch's CPU
  (and CUDA) generators as plain JSON.
* :func:`check_resume_settings` -- refuse to continue a checkpoint under other settings.
* :class:`RunCheckpoint` -- ``<out>/checkpoint/``: the caller writes its agent's files into the
  directory; ``run.json`` beside them holds the env-step count, the ``TrainingMonitor`` state (eval
  rows, retrain events, timing split) and the RNG states.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from .validation import non_negative_int

PathLike = Union[str, os.PathLike]
RUN_FILE = "run.json"
RUN_VERSION = 1


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it replaces ``path``.

    The swap is two renames (``path`` -> ``path.old``, ``tmp`` -> ``path``); a kill between them
    leaves ``path.old``, which :func:`resolve_directory` returns. On an exception the temporary
    directory is removed and ``path`` is untouched.

    An existing ``path`` is replaced only when it is empty or holds nothing but names the new
    directory holds too (an earlier save of the same kind): a user's run directory with other files
    in it is never swapped out and deleted.

    Raises:
        NotADirectoryError: ``path`` exists and is not a directory.
        FileExistsError: ``path`` holds entries the new directory would not (named in the message);
            ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory; save into a directory path")
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _check_replaceable(path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(path: Path, new: Path) -> None:
    """Raise ``FileExistsError`` when ``path`` holds entries ``new`` does not (files the swap would delete)."""
    if not path.is_dir():
        return
    foreign = sorted({p.name for p in path.iterdir()} - {p.name for p in new.iterdir()})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds {shown}, which this save would not write; it replaces the whole "
                              f"directory, so it refuses to delete them: save into a new or empty directory")


def resolve_directory(path: PathLike) -> Optional[Path]:
    """``path`` if it is a directory, else ``path.old`` (a kill mid-swap), else ``None``."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    return old if old.is_dir() else None


def write_weights_only(path: PathLike, files: Dict[str, Any]) -> None:
    """Write each of ``files`` (name -> tensors and plain python) with ``torch.save`` into directory
    ``path``, swapped in whole (:func:`atomic_directory`).

    Args:
        path: the directory.
        files: file name -> object; tensors, numbers, strings, lists, dicts only, so that
            :func:`read_weights_only` can load them with ``torch.load(weights_only=True)``.
    """
    with atomic_directory(path) as tmp:
        for name, obj in files.items():
            torch.save(obj, tmp / name)


def read_weights_only(path: PathLike, names: Tuple[str, ...], what: str) -> Tuple[Path, Dict[str, Any]]:
    """Load files written by :func:`write_weights_only` through ``torch.load(weights_only=True)``: a file
    carrying code (a pickled object of any class) is refused, never run.

    Args:
        path: the directory (``path.old`` after a kill between the swap's renames).
        names: the files to load.
        what: names the checkpoint in messages.

    Returns:
        ``(directory, {name: object})``, tensors on the CPU.

    Raises:
        FileNotFoundError: no such directory or file.
        ValueError: a file that is truncated, not a torch file, or carries anything but tensors and
            plain python (the message names the file).
    """
    d = resolve_directory(path)
    if d is None:
        raise FileNotFoundError(f"no {what} at {path}")
    out = {}
    for name in names:
        try:
            out[name] = torch.load(d / name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # pickle and zip errors, weights_only refusals
            raise ValueError(f"could not load {what} {d / name}: {type(e).__name__}: {e}") from None
    return d, out


def rng_state() -> Dict[str, Any]:
    """Python ``random``, numpy's global RNG and torch's generators, as JSON-able lists."""
    py = random.getstate()
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when CUDA is present here too)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def check_resume_settings(saved: Dict[str, Any], current: Dict[str, Any], may_change=()) -> None:
    """Refuse to resume under other settings.

    Args:
        saved: the checkpointed run's settings (e.g. a script's flags).
        current: the resuming run's settings.
        may_change: names that may differ.

    Raises:
        ValueError: naming every setting in both that differs, except those in ``may_change``.
    """
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} (now {v!r})" for k, v in current.items()
            if k not in may_change and k in saved and saved[k] != v]
    if diff:
        raise ValueError("the checkpoint was made with other settings: " + ", ".join(diff))


class RunCheckpoint:
    """A training run's checkpoint directory, written every ``every`` env steps.

    Args:
        path: the directory (e.g. ``<out>/checkpoint``); its parent is created on the first save.
        every: env steps between checkpoints; 0 turns saving off (``load`` still works).

    Raises:
        ValueError: ``every`` is not an int >= 0.

    Loop::

        ckpt = RunCheckpoint(Path(out) / "checkpoint", every=1000)
        loaded = ckpt.load() if resume else None       # (directory, run state) or None
        ...
        if ckpt.due(env_steps):                        # at a point where the agent is consistent
            ckpt.save(env_steps, monitor, write_agent=lambda d: agent.save(d / "agent"))
    """

    def __init__(self, path: PathLike, every: int = 0):
        self.path = Path(path)
        self.every = non_negative_int("checkpoint every (0 = off)", every)
        self.last_saved: Optional[int] = None

    def due(self, env_steps: int) -> bool:
        """True when saving is on and a multiple of ``every`` was reached since the last save."""
        if not self.every:
            return False
        last = self.last_saved or 0
        return env_steps // self.every > last // self.every

    def save(self, env_steps: int, monitor, write_agent: Callable[[Path], None],
             extra: Optional[Dict[str, Any]] = None) -> Path:
        """Write the agent, ``monitor.state_dict()`` and the RNG states, swapped in atomically.

        Args:
            env_steps: the run's env-step count.
            monitor: a :class:`~synther_buffer.results.TrainingMonitor` (or anything with
                ``state_dict()`` returning JSON-able data).
            write_agent: writes the agent's files into the directory it is given.
            extra: more JSON-able state for the run.

        Returns:
            The checkpoint directory.
        """
        run = {"version": RUN_VERSION, "env_steps": int(env_steps), "monitor": monitor.state_dict(),
               "rng": rng_state(), "extra": extra or {}}
        with atomic_directory(self.path) as tmp:
            write_agent(tmp)
            with open(tmp / RUN_FILE, "w") as f:
                # NaN / inf allowed (Python's json reads them back): a diverged evaluation or temperature
                # must reach the resumed run as it was, not end this one at its checkpoint
                json.dump(run, f)
        self.last_saved = int(env_steps)
        return self.path

    def load(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The last complete checkpoint.

        Returns:
            ``(directory, run state)``, or ``None`` if there is none.

        Raises:
            ValueError: a checkpoint exists but its ``run.json`` is unreadable or of another version
                (a checkpoint is never silently ignored).
        """
        d = resolve_directory(self.path)
        if d is None or not (d / RUN_FILE).is_file():
            return None
        try:
            with open(d / RUN_FILE) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable run checkpoint {d / RUN_FILE}: {type(e).__name__}: {e}") from None
        if not isinstance(run, dict) or run.get("version") != RUN_VERSION or "env_steps" not in run:
            raise ValueError(f"{d / RUN_FILE} is not a run checkpoint of version {RUN_VERSION}")
        self.last_saved = int(run["env_steps"])
        return d, run
