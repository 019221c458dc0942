"""synther_buffer: SynthER (Synthetic Experience Replay) as a drop-in replay buffer.

    from synther_buffer import SynthERConfig, TransitionDiffusion, GenerativeReplay, GenerativeReplayBuffer
    from synther_buffer import WrappedReplay   # SynthER around a loop's own replay buffer

``GenerativeReplayBuffer`` (stable-baselines3) is imported lazily so the core never imports an RL framework.
"""

from .config import SynthERConfig
from .diffusion import DiffusionTrainingError, TransitionDiffusion

__version__ = "0.1.0"
__all__ = ["SynthERConfig", "TransitionDiffusion", "GenerativeReplay", "GenerativeReplayBuffer", "WrappedReplay",
           "DiffusionTrainingError", "__version__"]


def __getattr__(name):
    if name in ("GenerativeReplay", "WrappedReplay"):
        from . import replay
        return getattr(replay, name)
    if name == "GenerativeReplayBuffer":
        from .sb3 import GenerativeReplayBuffer  # needs stable-baselines3
        return GenerativeReplayBuffer
    raise AttributeError(f"module 'synther_buffer' has no attribute {name!r}")
