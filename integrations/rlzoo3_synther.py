"""An rl-zoo3 hyperparameter file that trains with SynthER's replay buffer.

    python -m rl_zoo3.train --algo sac --env Pendulum-v1 -conf integrations/rlzoo3_synther.py
    python -m rl_zoo3.train --algo tqc --env HalfCheetah-v5 -conf integrations/rlzoo3_synther.py -n 100000

Why a Python file: rl-zoo3 ``eval``s the YAML strings ``replay_buffer_class`` and
``replay_buffer_kwargs`` in the namespace of its own ``exp_manager`` module, where neither
``GenerativeReplayBuffer`` nor ``SynthERConfig`` is defined (a YAML ``replay_buffer_class:
GenerativeReplayBuffer`` fails with a ``NameError``). A ``-conf`` file ending in ``.py`` is
``exec``ed instead and its ``hyperparams`` dict is used as is, so it can hold the class and the
config objects themselves. rl-zoo3 picks ``hyperparams[<env id>]`` when there is one, else
``hyperparams["default"]``.

The settings are the paper's online recipe for SAC-style agents (seed D.2): one env step, then
``gradient_steps=20`` updates (UTD 20), SynthER batches half real, half synthetic. They suit every
off-policy algorithm of SB3 / sb3-contrib with a Box action space (``sac``, ``td3``, ``ddpg``,
``tqc``, ``crossq``; SB3 stores their actions rescaled to [-1, 1], the buffer's default
``action_bounds``). ``SynthERLogCallback`` puts the ``synther/*`` metrics (retrains, diffusion
loss, pool size) in rl-zoo3's log. ``config=None`` picks the ``paper`` preset on CUDA and ``fast``
on CPU; pass ``SynthERConfig.preset(...)`` for another. Override any value from the command line
with rl-zoo3's ``-params`` (``-params learning_starts:1000``) or ``-n`` for ``n_timesteps``.

Tested by ``tests/test_rlzoo.py`` (rl-zoo3 2.9.2, stable-baselines3 2.9.2, sb3-contrib 2.9.2): sac and tqc
by default, td3, ddpg and crossq in the slow set.
"""

from synther_buffer import GenerativeReplayBuffer, SynthERConfig  # noqa: F401  (SynthERConfig: for edits)

synther_sac = dict(
    n_timesteps=100_000,
    policy="MlpPolicy",
    learning_starts=5_000,
    batch_size=256,
    train_freq=1,
    gradient_steps=20,                         # UTD 20
    replay_buffer_class=GenerativeReplayBuffer,
    replay_buffer_kwargs=dict(config=None),    # None: paper preset on CUDA, fast on CPU
    callback="synther_buffer.sb3.SynthERLogCallback",
)

hyperparams = {
    "default": synther_sac,
}
