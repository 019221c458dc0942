"""An SB3 training run with a SynthER replay buffer: the driver of ``synther train`` and ``integrations/sb3_sac.py``.

The front ends own what differs between them: their flags, the ``SynthERConfig`` and the agent (a
``make_agent(env)`` that builds, say, ``SAC("MlpPolicy", env, replay_buffer_class=GenerativeReplayBuffer,
...)``). ``SB3Run`` owns the rest, written once:

* threads (1 on CPU unless told: two torch threads competing for two shared cores run far slower),
  the training and evaluation envs (``synther_buffer.envs.make_env``), the wall-clock split;
* ``--resume``: the agent, its replay buffer (real data, diffusion model, synthetic pool, schedule) and
  the RNG states from ``<out>/checkpoint``, refusing other settings or a smaller buffer;
* ``learn`` with a callback that feeds every env step to the ``TrainingMonitor`` (progress bar,
  evaluations, retrain timings) and writes a checkpoint every ``--checkpoint-every`` env steps (deferred
  while a background retrain runs), and one at the end;
* the results: ``eval_returns.csv``, ``results.json``, ``learning_curve.png`` and the summary table;
* ``--save-pool PATH``: the final synthetic pool and the real transitions as ``.npz`` transition files
  (``save_pool``), for scoring its fidelity (``synther report``, ``synther_buffer.oracle``).

The flags read from ``args``: ``env``, ``seed``, ``total_steps``, ``eval_every``, ``eval_episodes``,
``out``, ``device``, ``threads``, ``quiet`` and, when the front end has them, ``checkpoint_every``,
``resume`` and ``save_pool``. Needs the ``sb3`` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch

from .sb3 import GenerativeReplayBuffer  # first: its ImportError names the extra to install
from stable_baselines3 import SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

import numpy as np

from .checkpoint import RunCheckpoint, check_resume_settings, set_rng_state
from .config import WARM_START_DEFAULT_TEXT, SynthERConfig
from .diffusion import resolve_device
from .envs import make_env
from .results import Results, TimingSplit, TrainingMonitor, format_summary

# Flags a resumed run may change; every other flag must equal the checkpointed run's.
RESUMABLE_FLAGS = frozenset({"total_steps", "out", "device", "threads", "quiet", "checkpoint_every", "resume",
                             "save_pool"})


def synther_config(base: SynthERConfig, args: argparse.Namespace) -> SynthERConfig:
    """``base`` (a preset) with the run's flags applied.

    Args:
        base: the preset to start from.
        args: the flags; ``device``, ``seed`` and ``quiet`` always apply, ``retrain_every``,
            ``real_ratio``, ``train_steps``, ``num_generate``, ``precision``, ``warm_start_steps`` when
            given (not None), ``compile``, ``async_retrain`` and ``warm_start`` when set; ``fixed_budget``
            (when set) turns the data-size budget rule off (``train_steps_rows=None``: every fit trains
            ``train_steps``).

    Returns:
        The config.

    Raises:
        ValueError: a flag gives a field an invalid value (the message names the field).
    """
    changes: Dict[str, Any] = dict(device=args.device, seed=args.seed, progress=not args.quiet)
    for field in ("retrain_every", "real_ratio", "train_steps", "num_generate", "precision", "warm_start_steps"):
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    for field in ("compile", "async_retrain", "warm_start"):
        if getattr(args, field, False):
            changes[field] = True
    for field in ("relevance", "guidance_scale"):   # relevance-guided generation (PGR), when given
        if getattr(args, field, None) is not None:
            changes[field] = getattr(args, field)
    if getattr(args, "fixed_budget", False):   # the paper's fixed diffusion budget (issue 24's old arm)
        changes["train_steps_rows"] = None
    return base.replace(**changes)


def real_pool_path(path) -> Path:
    """Where ``save_pool(buffer, path)`` writes the real transitions: ``final_pool.npz`` ->
    ``final_pool.real.npz`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".real.npz")


def save_pool(buffer: GenerativeReplayBuffer, path) -> Optional[Tuple[Path, Path]]:
    """Write ``buffer``'s whole synthetic pool to ``path`` and its real transitions to
    ``real_pool_path(path)``, both ``.npz`` transition files (``observations``, ``actions``, ``rewards``,
    ``next_observations``, ``terminals``: what ``synther_buffer.datasets.load_transitions`` reads).

    Score the pool with ``synther report <path's .real.npz> <path> --env-id ENV`` or
    ``oracle.score_transitions(env, load_transitions(path), reference=load_transitions(real))`` (errors
    in units of the real data's std). Both files are written to temporary names, then renamed: a kill
    while writing leaves the previous pair (or none). Waits for a background retrain first.

    Returns:
        The two paths, or None (nothing written) when the pool is empty (no retrain yet).
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"--save-pool writes an .npz transitions file; got {str(path)!r}")
    buffer.wait()
    synthetic = buffer.synthetic_transitions()
    if len(synthetic["observations"]) == 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    real_path = real_pool_path(path)
    pairs = [(target, target.with_name(target.name + ".tmp.npz")) for target in (path, real_path)]
    try:
        for (_, tmp), data in zip(pairs, (synthetic, buffer.real_transitions())):
            np.savez(tmp, **data)
        for target, tmp in pairs:   # both written before either replaces: a failed write leaves the old pair
            os.replace(tmp, target)
    finally:
        for _, tmp in pairs:
            tmp.unlink(missing_ok=True)
    return path, real_path


def budget_rule_text(c: SynthERConfig) -> str:
    """`` (x (rows / 10,000)^0.5 above 10,000 rows, at most 60,000)`` when ``c`` has a data-size rule."""
    if c.train_steps_rows is None:
        return ""
    cap = f", at most {c.max_train_steps:,}" if c.max_train_steps is not None else ""
    return f" (x (rows / {c.train_steps_rows:,})^{c.train_steps_power:g} above {c.train_steps_rows:,} rows{cap})"


def retrain_mode_text(c: SynthERConfig) -> str:
    """How retrains run beyond the default (cold, synchronous, unguided), for the run's header line:
    warm start, background retraining, relevance guidance; ``""`` for the paper's schedule."""
    parts = []
    if c.warm_start:
        steps = (f"{c.warm_start_steps:,} steps" if c.warm_start_steps is not None
                 else WARM_START_DEFAULT_TEXT)
        parts.append(f"warm retrains after the first ({steps})")
    if c.async_retrain:
        parts.append("in a Ray actor" if c.retrain_backend == "ray" else "in a background thread")
    if c.relevance is not None:
        parts.append(f"PGR: {c.relevance} relevance, guidance scale {c.guidance_scale:g}, sampled at the top "
                     f"{c.relevance_top_frac:.0%} of real scores")
    return "".join(f"; {p}" for p in parts)


def sac_temperature(model) -> Dict[str, float]:
    """``{"alpha": SAC's entropy temperature}`` (learned or fixed), ``{}`` for an agent without one."""
    log_coef = getattr(model, "log_ent_coef", None)
    if log_coef is not None:
        return {"alpha": float(log_coef.detach().exp().item())}
    coef = getattr(model, "ent_coef_tensor", None)
    return {} if coef is None else {"alpha": float(coef.item())}


class MonitorCallback(BaseCallback):
    """Hands every env step to the ``TrainingMonitor`` and writes the checkpoint when due.

    Args:
        monitor: the run's monitor (progress bar, evaluations, retrain timings).
        checkpoint: the run's checkpoint directory and schedule.
        save_checkpoint: writes a checkpoint now.
        busy: True while a background retrain runs; a due checkpoint waits until it is False
            (pickling the buffer would wait for the retrain).
    """

    def __init__(self, monitor: TrainingMonitor, checkpoint: RunCheckpoint, save_checkpoint: Callable[[], None],
                 busy: Callable[[], bool] = lambda: False):
        super().__init__()
        self.monitor, self.checkpoint, self.save_checkpoint, self.busy = monitor, checkpoint, save_checkpoint, busy

    def _on_step(self) -> bool:
        # SB3 calls this right after env.step, before it stores the transition and runs the step's updates
        self.monitor.step(self.num_timesteps)
        return True

    def _on_rollout_start(self) -> None:
        # Between env steps: the last step's transition is stored and its UTD updates are done.
        if self.checkpoint.due(self.num_timesteps) and not self.busy():
            self.save_checkpoint()


class SB3Run:
    """Set up an SB3 run (threads, envs, agent or a checkpoint to resume); ``train()`` runs it.

    Args:
        args: the front end's flags (see the module docstring for those read here).
        make_agent: ``make_agent(env)`` -> a new SB3 agent (not called when resuming).
        synther: the agent's ``SynthERConfig`` (None for a plain-buffer baseline): printed and
            stored in ``results.json``.
        title: the run's one-line description (printed, and the summary table's title).
        buffer_size: real transitions the agent's buffer keeps; a checkpoint whose buffer holds fewer
            is refused on resume (the run would overwrite its oldest real data).
        extra_config: merged into ``results.json``'s ``config`` after the flags.
        agent_class: the class whose ``load`` restores a checkpointed agent.

    Raises:
        ValueError: a bad flag, env id or device, or a checkpoint made with other settings.
    """

    def __init__(self, args: argparse.Namespace, make_agent: Callable[[Any], BaseAlgorithm], *,
                 synther: Optional[SynthERConfig], title: str, buffer_size: int,
                 extra_config: Optional[Dict[str, Any]] = None, agent_class: Type[BaseAlgorithm] = SAC):
        self.args, self.synther, self.title = args, synther, title
        if getattr(args, "save_pool", None) and synther is None:
            raise ValueError("--save-pool writes the SynthER buffer's synthetic pool; this run uses a plain "
                             "replay buffer (--no-synther), which has none. Drop --save-pool or --no-synther.")
        if getattr(args, "save_pool", None) and Path(args.save_pool).suffix != ".npz":
            raise ValueError(f"--save-pool writes an .npz transitions file; got {args.save_pool!r}")
        self.timing = TimingSplit()  # wall clock: setup / RL / diffusion fit / diffusion sampling / eval
        if synther is not None and synther.async_retrain:  # overlaps the RL loop: reported, not subtracted
            self.timing.concurrent.update({"diffusion_fit", "diffusion_sample"})
        device = resolve_device(args.device)
        self.threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.env = make_env(args.env, seed=args.seed)
        self.eval_env = make_env(args.env, seed=args.seed + 10_000)
        self.checkpoint = RunCheckpoint(Path(args.out) / "checkpoint", every=getattr(args, "checkpoint_every", 0))
        loaded = self.checkpoint.load() if getattr(args, "resume", False) else None
        self.resumed_at = None
        if loaded:
            self.model = self._resume(*loaded, agent_class, buffer_size)
        else:
            self.model = make_agent(self.env)
        config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
        self.config = dict(config, threads=self.threads, **(extra_config or {}),
                           synther=None if synther is None else synther.to_dict())
        self.timing.mark("setup")

    def _resume(self, directory: Path, run: dict, agent_class: Type[BaseAlgorithm], buffer_size: int):
        """The agent and its replay buffer from a checkpoint; RNGs restored, envs reseeded."""
        try:
            check_resume_settings(run["extra"]["args"], vars(self.args), may_change=RESUMABLE_FLAGS)
        except ValueError as e:
            raise ValueError(f"--resume from {self.checkpoint.path}: {e}") from None
        model = agent_class.load(directory / "agent.zip", env=self.env, device=self.args.device)
        model.load_replay_buffer(directory / "replay_buffer.pkl")
        if isinstance(model.replay_buffer, GenerativeReplayBuffer):   # --device, --quiet may differ from the saved run's
            model.replay_buffer.core.to_device(self.args.device)
            model.replay_buffer.set_progress(not self.args.quiet)
        capacity = model.replay_buffer.buffer_size * model.replay_buffer.n_envs
        if capacity < buffer_size:
            raise ValueError(f"--resume: the checkpoint's replay buffer holds {capacity:,} transitions; "
                             f"--total-steps {self.args.total_steps:,} would overwrite the oldest real data. "
                             "Start a new run with the larger --total-steps instead.")
        self.resumed_at = int(run["env_steps"])
        self.monitor_state = run["monitor"]
        set_rng_state(run["rng"])
        model.env.seed(self.args.seed + self.resumed_at)  # a fresh episode, seeded from the step count
        self.eval_env.reset(seed=self.args.seed + 10_000 + self.resumed_at)
        return model

    @property
    def buffer(self) -> Optional[GenerativeReplayBuffer]:
        """The agent's SynthER buffer (None for a plain SB3 buffer)."""
        buf = self.model.replay_buffer
        return buf if isinstance(buf, GenerativeReplayBuffer) else None

    def _save_agent(self, directory: Path) -> None:
        self.model.save(directory / "agent.zip")
        self.model.save_replay_buffer(directory / "replay_buffer.pkl")

    def _save_checkpoint(self) -> None:
        self.checkpoint.save(self.model.num_timesteps, self.monitor, self._save_agent,
                             extra={"args": vars(self.args)})

    def _retraining(self) -> bool:
        return self.buffer is not None and bool(self.buffer.stats()["retraining"])

    def train(self) -> int:
        """Train the rest of ``total_steps``, checkpoint, evaluate, write the results, print the table.

        Returns:
            The exit status: 0, or 130 after Ctrl-C (the results so far are written).
        """
        args, model, buffer = self.args, self.model, self.buffer
        title = self.title + ("" if self.resumed_at is None else f" (resumed at env step {self.resumed_at:,})")
        results = Results(args.out, config=self.config, title=title)
        self.monitor = TrainingMonitor(
            results, args.total_steps, args.eval_every, args.eval_episodes, self.eval_env,
            policy_fn=lambda obs: model.predict(obs, deterministic=True)[0],
            stats_fn=None if buffer is None else buffer.stats, agent_stats_fn=lambda: sac_temperature(model),
            timing=self.timing, progress=not args.quiet, eval_at_start=self.resumed_at is None)
        if self.resumed_at is not None:
            self.monitor.load_state_dict(self.monitor_state)
        print(title, flush=True)
        if self.synther is not None:
            c = self.synther
            print(f"SynthER: retrain every {c.retrain_every:,} env steps (from {c.min_real:,} real transitions), "
                  f"{c.train_steps:,} diffusion steps{budget_rule_text(c)}, {c.num_generate:,} rows per retrain, real ratio "
                  f"{c.real_ratio}, device {resolve_device(c.device)}{retrain_mode_text(c)}", flush=True)
        rc = 0
        try:
            remaining = args.total_steps - model.num_timesteps
            if remaining > 0:
                callback = MonitorCallback(self.monitor, self.checkpoint, self._save_checkpoint, self._retraining)
                model.learn(remaining, callback=callback, reset_num_timesteps=self.resumed_at is None)
        except KeyboardInterrupt:
            print("\ninterrupted: writing partial results", file=sys.stderr)
            rc = 130
        if buffer is not None:
            buffer.wait()  # a background retrain (async_retrain) still running
        if rc == 0 and self.checkpoint.every and self.checkpoint.last_saved != model.num_timesteps:
            self._save_checkpoint()
        if buffer is not None and getattr(args, "save_pool", None):
            saved = save_pool(buffer, args.save_pool)
            if saved is None:
                print(f"--save-pool: the synthetic pool is empty (no retrain yet); nothing written to "
                      f"{args.save_pool}", file=sys.stderr, flush=True)
            else:
                s = buffer.stats()
                print(f"saved the final synthetic pool ({s['num_synthetic']:,} rows, model fitted at env step "
                      f"{s['last_retrain_env_step']:,}) to {saved[0]} and the {s['num_real']:,} real transitions "
                      f"to {saved[1]}", flush=True)
        self.monitor.env_steps = model.num_timesteps
        summary = self.monitor.finish(final_stats=None if buffer is None else buffer.stats())
        print("\n" + format_summary(summary, title=title), flush=True)
        return rc
