"""Optional dependencies: import them where they are needed, and name the extra that provides them.

The core install (``pip install synther-buffer``) carries torch, numpy and tqdm: enough for
``TransitionDiffusion``, ``GenerativeReplay`` and ``WrappedReplay``. Everything else comes with an
extra (see ``setup.cfg``):

* ``sb3``: stable-baselines3 and gymnasium (``GenerativeReplayBuffer``, ``synther train``);
* ``envs``: gymnasium >= 1.0, MuJoCo, dm_control, shimmy, imageio (``synther_buffer.envs.make_env``
  for DMC and MuJoCo tasks, simulator-oracle fidelity scoring);
* ``offline``: h5py and matplotlib (D4RL / Minari HDF5 files, ``synther report`` histograms,
  learning-curve plots).

Every optional import in the package goes through :func:`require`, so a missing extra fails at
the call that needs it with a message that says what to install, never at
``import synther_buffer``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]

EXTRAS = {
    "sb3": "stable-baselines3 and gymnasium (GenerativeReplayBuffer, synther train)",
    "envs": "MuJoCo, dm_control, shimmy and gymnasium >= 1.0 (make_env, simulator-oracle fidelity)",
    "offline": "h5py and matplotlib (HDF5 datasets, synther report, learning-curve plots)",
    "distributed": "Ray (benchmark campaigns, sharded upsampling and retraining on a cluster)",
    "torchrl": "torchrl and tensordict (synther_buffer.torchrl.SynthERTransform for TensorDictReplayBuffer)",
}
"""The extras that :func:`require` may name, with what each one brings."""


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``.

    Args:
        extra: the extra's name, e.g. ``"envs"``.

    Returns:
        ``pip install "synther-buffer[<extra>]"``.
    """
    return f'pip install "synther-buffer[{extra}]"'


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it.

    A subclass of ``ImportError``, so ``except ImportError`` keeps working.

    Attributes:
        extra: the extra to install, e.g. ``"envs"``.
        module: the module that failed to import (``name`` holds it too, as for any ImportError).
    """

    def __init__(self, module: str, extra: str, purpose: Optional[str] = None,
                 cause: Optional[BaseException] = None, installed: bool = False):
        """Build the message.

        Args:
            module: the module that could not be imported.
            extra: the extra that provides it.
            purpose: what needed it (e.g. ``"reading HDF5 datasets"``), said first in the message.
            cause: the original ImportError, quoted at the end of the message.
            installed: the package is present but its import failed (a broken or mismatched
                install), which the message then says instead of "missing".
        """
        what = f"{purpose} needs" if purpose else "this needs"
        if installed:
            msg = (f"{what} the Python package {module!r} (from the {extra!r} extra), which is installed but "
                   f"failed to import; reinstalling the extra may fix it: {install_hint(extra)}")
        else:
            msg = f"{what} the Python package {module!r}, which comes with the {extra!r} extra: {install_hint(extra)}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        super().__init__(msg, name=module)
        self.extra = extra
        self.module = module


def require(module: str, extra: str, purpose: Optional[str] = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that provides it.

    Args:
        module: a dotted module name, e.g. ``"h5py"`` or ``"stable_baselines3.common.buffers"``.
        extra: the extra that installs it (one of :data:`EXTRAS`).
        purpose: what needs the module, for the message (e.g. ``"GenerativeReplayBuffer"``).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the import failed (the original ImportError is chained as its cause).
        ValueError: ``extra`` is not one of :data:`EXTRAS` (a programming error).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except MissingExtraError:  # raised inside ``module`` itself: it already names its extra
        raise
    except ImportError as e:
        raise MissingExtraError(module, extra, purpose, cause=e, installed=_installed(module)) from e


def _installed(module: str) -> bool:
    """Whether the top-level package of ``module`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules (a blocked import)
        return False
