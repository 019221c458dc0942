"""The paper's online experiment (seed D.2, Section 4.2): SAC vs SAC (SynthER) vs REDQ at UTD=20.

    python -m benchmarks.utd20 --preset cpu                      # cheetah-run, 2 seeds, 10K steps (~3-5 h on 2 cores)
    python -m benchmarks.utd20 --preset paper --seeds 5          # 8 tasks, 100K steps, paper diffusion (GPU)
    python -m benchmarks.utd20 --preset smoke --out /tmp/utd20   # seconds: Pendulum-v1, tiny everything
    python -m benchmarks.utd20 --preset cpu --report-only        # tables / plots / IQM from what has finished
    python -m benchmarks.utd20 --preset paper --precision bf16   # the SynthER arms' diffusion in bfloat16
    python -m benchmarks.utd20 --preset cpu --envs cheetah-run --arms synther_utd20 synther_utd20_fixed \
        --seeds 1 --total-steps 30000 --dump-pool                # issue 24's online check (own roots: below)

Arms (same envs, same seeds):

==============  ==============================================================================
sac_utd1        SB3 SAC, UTD=1, plain replay            (integrations/sb3_sac.py --no-synther --utd 1)
sac_utd20       SB3 SAC, UTD=20, plain replay           (integrations/sb3_sac.py --no-synther --utd 20)
synther_utd20   SAC (SynthER): SB3 SAC, UTD=20, GenerativeReplayBuffer  (integrations/sb3_sac.py --utd 20)
redq_utd20      REDQ: 10 critics, min of a random 2, UTD=20, real data only
                (integrations/custom_sac.py --num-q 10 --num-min 2 --no-synther)
==============  ==============================================================================

Opt-in arms (``--arms``; not in a preset's default arms): ``synther_utd20_async`` (``--async-retrain``),
``pgr_utd20`` (``--relevance curiosity``) and ``synther_utd20_fixed`` (``--fixed-budget``: every
diffusion fit trains the preset's ``train_steps`` whatever the data size, the paper's rule, against
``synther_utd20``'s data-size rule; the two differ in that switch alone, and only when the SynthER
preset has a rule, ``train_steps_rows``).

``--dump-pool``: each SynthER unit writes its final synthetic pool (``final_pool.npz``) and its real
transitions (``final_pool.real.npz``) into its work directory (``sb3_sac.py --save-pool``; never
committed: ``*.npz`` is gitignored), and when it finishes the pool is replayed in the simulator
(``synther_buffer.oracle.score_transitions``, errors in units of the std of the unit's own real
transitions) into ``pool_fidelity.json`` beside its results (kilobytes, committed with the unit; a
"Final synthetic pool fidelity" table in the report). It does not change what a unit computes, so it is
not part of a unit's settings: a unit finished without it stays done (and is scored if its work
directory still holds the pool).

``--total-steps N`` other than the preset's, without ``--out``/``--work``, runs under roots of its own
(the preset's with ``_<N>steps`` appended, e.g. ``benchmarks/results/cpu_30000steps``), so such units
never meet (and never stale-move) the preset's committed ones; pass the same ``--total-steps`` to
``--dry-run`` / ``--report-only``, or give ``--out`` / ``--work`` explicitly.

Units and resume. Each (env, arm, seed) is one *unit*, run as a subprocess of its integration script
(which writes ``eval_returns.csv``, ``results.json`` and ``learning_curve.png``) into
``<out>/<env>/<arm>/seed<k>/``. When the script exits 0 with a final evaluation in its JSON, this
benchmark writes ``unit.json`` (status ``done``, the exact command, settings, wall time) beside them.
A rerun of the benchmark skips every unit whose ``unit.json`` says done *with the same settings*; a
done unit whose settings differ (another preset or step budget in the same ``--out``) is moved aside to
``seed<k>.stale-<n>/`` and run again. Every unit runs with ``--checkpoint-every <eval_every> --resume``,
so a unit that was interrupted (a directory without a done ``unit.json``) **continues from its last
checkpoint** (``<unit>/checkpoint/``: agent, replay buffer with SynthER's model and pool, evaluations
so far, RNG states); one interrupted before its first checkpoint starts over. A finished unit's
checkpoint is deleted unless ``--keep-checkpoints`` (it holds the final agent). A unit whose
recorded child process is still alive is refused (two writers in one directory). Units run one at a
time (``--jobs N`` runs N at once; on 2 cores, 1 is right). The child gets SIGTERM if this process
dies (Linux ``PR_SET_PDEATHSIG``), so a killed benchmark leaves no orphan writing into a unit.

Report (written after the runs, on interruption, and by ``--report-only``), under ``<out>/``:
``summary.md`` (everything below in markdown), ``final_returns.{md,csv}``, ``timing.csv``,
``aggregate.csv``, ``summary.json`` and ``curves_<env>.png`` (per arm: mean eval return over seeds,
shaded +- 1 std across seeds). Aggregate scores (IQM and mean with 95% stratified-bootstrap CIs, as
rliable computes them; the ``rliable`` package is used when importable, else the numpy version here)
are computed over normalised final returns when 2+ envs have results: DMC returns / 1000; gymnasium
MuJoCo by D4RL's random/expert reference returns; any other env min-max over all its runs.

See benchmarks/UTD20.md for the presets' budgets and their arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .utd20_docs import md_table, render_block, update_docs

REPO = Path(__file__).resolve().parents[1]
UNIT_FILE = "unit.json"
RUNNING_FILE = "running.json"
LOCK_FILE = ".lock"

# --------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    script: str            # relative to the repository root
    high_utd: bool         # UTD = the preset's high UTD (20), else 1
    synther: bool
    extra: Tuple[str, ...] = ()
    # SynthERConfig changes that ``extra`` makes, so a unit records the config it actually runs
    synther_changes: Tuple[Tuple[str, Any], ...] = ()


ARMS: Dict[str, Arm] = {a.name: a for a in (
    Arm("sac_utd1", "SAC (UTD=1)", "integrations/sb3_sac.py", high_utd=False, synther=False),
    Arm("sac_utd20", "SAC (UTD=20)", "integrations/sb3_sac.py", high_utd=True, synther=False),
    Arm("synther_utd20", "SAC (SynthER, UTD=20)", "integrations/sb3_sac.py", high_utd=True, synther=True),
    Arm("redq_utd20", "REDQ (UTD=20)", "integrations/custom_sac.py", high_utd=True, synther=False,
        extra=("--num-q", "10", "--num-min", "2")),
    # Issue 6's wall-clock comparison: the SynthER arm with retrains in a background thread (opt-in).
    Arm("synther_utd20_async", "SAC (SynthER, UTD=20, async retrain)", "integrations/sb3_sac.py", high_utd=True,
        synther=True, extra=("--async-retrain",)),
    # Issue 19: Prioritized Generative Replay (curiosity-guided SynthER, PGR's best relevance) (opt-in).
    Arm("pgr_utd20", "SAC (PGR curiosity, UTD=20)", "integrations/sb3_sac.py", high_utd=True,
        synther=True, extra=("--relevance", "curiosity")),
    # Issue 18: the SynthER arm with warm-started retrains (a quarter of the cold budget after the first; opt-in).
    Arm("synther_utd20_warm", "SAC (SynthER, UTD=20, warm retrain)", "integrations/sb3_sac.py", high_utd=True,
        synther=True, extra=("--warm-start",)),
    # Issue 24's online check: the SynthER arm with the paper's fixed diffusion budget (opt-in).
    Arm("synther_utd20_fixed", "SAC (SynthER, fixed diffusion budget, UTD=20)", "integrations/sb3_sac.py",
        high_utd=True, synther=True, extra=("--fixed-budget",), synther_changes=(("train_steps_rows", None),)),
)}

PAPER_ARMS = ("sac_utd1", "sac_utd20", "synther_utd20", "redq_utd20")   # the paper's four (Section 4.2)
PAPER_ENVS = ("cheetah-run", "walker-walk", "quadruped-walk", "reacher-hard", "finger-turn_hard",
              "HalfCheetah-v5", "Walker2d-v5", "Hopper-v5")

# Published 100K-env-step DMC returns (5 seeds, the SynthER and PGR papers' tables), for orientation
# beside ours: a different budget (10x our cpu preset's), code and hardware. "SAC" is the papers' SAC row.
PAPER_100K = {"cheetah-run": {"sac_utd20": 347, "redq_utd20": 607, "synther_utd20": 729},
              "reacher-hard": {"sac_utd20": 654, "redq_utd20": 734, "synther_utd20": 839},
              "quadruped-walk": {"sac_utd20": 178, "redq_utd20": 497, "synther_utd20": 727}}

# D4RL's reference returns (random, expert) for its v2 MuJoCo tasks, used to normalise gymnasium scores.
GYM_REFERENCE = {"HalfCheetah": (-280.178953, 12135.0), "Walker2d": (1.629008, 4592.3),
                 "Hopper": (-20.272305, 3234.3)}


# --------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    envs: Tuple[str, ...]
    arms: Tuple[str, ...]
    seeds: int
    total_steps: int
    learning_starts: int
    utd: int                      # the "UTD=20" arms' ratio (smoke scales it down)
    eval_every: int
    eval_episodes: int
    synther_preset: str           # SynthERConfig preset for the SynthER arm
    synther_overrides: Dict[str, Any] = field(default_factory=dict)   # --retrain-every etc.
    hidden: int = 256
    device: str = "auto"
    default_out: str = "results/utd20"
    # Where units run (checkpoints, stdout.log); None = in ``out``. A separate work root keeps the
    # results directory to the small files that are committed (benchmarks/results/<preset>/).
    default_work: Optional[str] = None
    env_seeds: Dict[str, int] = field(default_factory=dict)             # seeds per env, where not ``seeds``
    arm_envs: Dict[str, Tuple[str, ...]] = field(default_factory=dict)   # an arm run only on these envs


PRESETS: Dict[str, Preset] = {
    # The paper: 100K env steps, 5K random steps (REDQ codebase), UTD 20, paper diffusion settings
    # (Tables 8/9: 1024x6 denoiser, 100K steps, 128-step stochastic Heun), retrain every 10K env steps,
    # 1M synthetic rows (D.2). Needs a GPU: one retrain is ~20 min on a V100.
    "paper": Preset("paper", PAPER_ENVS, PAPER_ARMS, seeds=5, total_steps=100_000, learning_starts=5_000,
                    utd=20, eval_every=5_000, eval_episodes=10, synther_preset="paper",
                    synther_overrides={}, device="auto", default_out="results/utd20_paper"),
    # 2 CPU cores, many sessions: three DMC tasks, 10K env steps (1K random), seeds 0-1 (0-2 on
    # cheetah-run), REDQ on cheetah-run only (its 10-critic update is ~2x SAC's). SynthER's `fast`
    # diffusion retrained every 2,250 env steps (at 2,250 / 4,500 / 6,750 / 9,000: none wasted at the
    # end). Results are committed under benchmarks/results/cpu/; checkpoints live outside the checkout.
    # Arithmetic: benchmarks/UTD20.md.
    "cpu": Preset("cpu", ("cheetah-run", "walker-walk", "reacher-hard"),
                  ("sac_utd20", "synther_utd20", "redq_utd20", "sac_utd1"), seeds=2,
                  total_steps=10_000, learning_starts=1_000, utd=20, eval_every=1_000, eval_episodes=5,
                  synther_preset="fast", synther_overrides={"retrain_every": 2_250}, device="cpu",
                  default_out="benchmarks/results/cpu", default_work="~/.cache/synther_buffer/utd20/cpu",
                  env_seeds={"cheetah-run": 3}, arm_envs={"redq_utd20": ("cheetah-run",)}),
    # Seconds, for tests: Pendulum-v1, 200 steps, UTD 2, tiny nets, tiny diffusion retrained at 100/200.
    "smoke": Preset("smoke", ("Pendulum-v1",), tuple(ARMS), seeds=1, total_steps=200, learning_starts=100,
                    utd=2, eval_every=100, eval_episodes=1, synther_preset="tiny",
                    synther_overrides={"retrain_every": 100, "train_steps": 200, "num_generate": 1_000},
                    hidden=64, device="cpu", default_out="results/utd20_smoke"),
}


# --------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    env: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{env_dirname(self.env)}/{self.arm}/seed{self.seed}"

    def dir(self, out: Path) -> Path:
        return Path(out) / env_dirname(self.env) / self.arm / f"seed{self.seed}"


def env_dirname(env: str) -> str:
    """A directory name for an env id (``dm_control/cheetah-run-v0`` -> ``dm_control_cheetah-run-v0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", env)


def unit_args(preset: Preset, unit: Unit) -> List[str]:
    """The integration script's flags for ``unit`` (everything but --out/--threads/--device/--quiet)."""
    arm = ARMS[unit.arm]
    args = ["--env", unit.env, "--total-steps", str(preset.total_steps), "--seed", str(unit.seed),
            "--utd", str(preset.utd if arm.high_utd else 1),
            "--learning-starts", str(preset.learning_starts), "--hidden", str(preset.hidden),
            "--eval-every", str(preset.eval_every), "--eval-episodes", str(preset.eval_episodes)]
    if arm.synther:
        args += ["--preset", preset.synther_preset]
        for k, v in sorted(preset.synther_overrides.items()):
            args += ["--" + k.replace("_", "-"), str(v)]
    else:
        args += ["--no-synther"]
    return args + list(arm.extra)


# SynthERConfig fields that do not change what a unit computes (set per run by the scripts' flags).
_CONFIG_RUNTIME_FIELDS = ("device", "seed", "progress")


def unit_settings(preset: Preset, unit: Unit) -> Dict[str, Any]:
    """What makes a finished unit reusable: the script, its flags and, for the SynthER arm, the resolved
    ``SynthERConfig`` (so a library preset changed between runs counts as other settings)."""
    settings: Dict[str, Any] = {"script": ARMS[unit.arm].script, "args": unit_args(preset, unit)}
    if ARMS[unit.arm].synther:
        from synther_buffer.config import SynthERConfig

        cfg = SynthERConfig.preset(preset.synther_preset).replace(**preset.synther_overrides)
        cfg = cfg.replace(**dict(ARMS[unit.arm].synther_changes)).to_dict()
        settings["synther_config"] = {k: v for k, v in cfg.items() if k not in _CONFIG_RUNTIME_FIELDS}
    return settings


def settings_match(recorded: Optional[dict], current: dict) -> bool:
    """A finished unit's recorded settings equal ``current`` (a marker written before the SynthER config
    was recorded matches on script and flags alone)."""
    if not isinstance(recorded, dict):
        return False
    return all((_configs_match(recorded[k], v) if k == "synther_config" else recorded.get(k) == v)
               for k, v in current.items() if k in recorded or k in ("script", "args"))


def _configs_match(recorded: Any, current: Dict[str, Any]) -> bool:
    """Recorded and current SynthER configs are the same run: equal, except that a field added to
    ``SynthERConfig`` since the unit ran (absent from ``recorded``) matches while it has its default."""
    from synther_buffer.config import SynthERConfig

    try:
        return SynthERConfig.from_dict(current).matches_record(recorded)
    except (TypeError, ValueError):   # not a config of this version
        return False


def plan(preset: Preset, envs: Sequence[str], arms: Sequence[str], seeds: Optional[int] = None) -> List[Unit]:
    """Units in run order: seed-major (a whole seed of every arm finishes before the next seed starts).

    ``seeds`` = N runs seeds 0..N-1 on every env; ``None`` takes the preset's (``env_seeds`` per env,
    else ``seeds``). An arm listed in the preset's ``arm_envs`` runs only on those envs.
    """
    per_env = {env: seeds if seeds is not None else preset.env_seeds.get(env, preset.seeds) for env in envs}
    return [Unit(env, arm, s) for s in range(max(per_env.values(), default=0)) for env in envs for arm in arms
            if s < per_env[env] and env in preset.arm_envs.get(arm, (env,))]


def resume_first(units: Sequence[Unit], statuses: Sequence[str]) -> List[Unit]:
    """``units`` with the interrupted (``partial``) ones moved to the front, each group in plan order.

    A restarted campaign finishes the work it had half done before it starts new units, so a stop
    leaves as few unfinished units (checkpoints on disk, no results) as possible.
    """
    if len(units) != len(statuses):
        raise ValueError(f"{len(units)} units but {len(statuses)} statuses")
    return ([u for u, s in zip(units, statuses) if s == "partial"]
            + [u for u, s in zip(units, statuses) if s != "partial"])


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def unit_status(preset: Preset, unit: Unit, out: Path, work: Optional[Path] = None) -> str:
    """``done`` | ``stale`` (done, other settings) | ``running`` (its child is alive) | ``partial`` | ``todo``.

    Done-ness is read from ``out`` (the results); a run in progress from ``work`` (default ``out``).
    """
    marker = _read_json(unit.dir(out) / UNIT_FILE)
    if marker and marker.get("status") == "done":
        return "done" if settings_match(marker.get("settings"), unit_settings(preset, unit)) else "stale"
    d = unit.dir(work if work is not None else out)
    if not d.exists():
        return "todo"
    running = _read_json(d / RUNNING_FILE)
    if running and _pid_alive(running.get("pid", -1)) and _cmdline_mentions(running["pid"], str(d)):
        return "running"
    return "partial"


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid


# --------------------------------------------------------------------------------------- running

# The child sets PR_SET_PDEATHSIG (SIGTERM when this process dies; survives into the script) and runs it.
_BOOT = ("import sys, runpy\n"
         "try:\n"
         "    import ctypes, signal; ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
         "except Exception:\n"
         "    pass\n"
         "sys.argv = sys.argv[1:]\n"
         "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


def _last_eval(d: Path) -> Optional[Dict[str, str]]:
    try:
        with open(d / "eval_returns.csv") as f:
            rows = list(csv.DictReader(f))
        return rows[-1] if rows else None
    except OSError:
        return None


class _Children:
    """Live child processes, so an interrupt can stop them, and no new one starts once it has."""

    def __init__(self):
        self.procs: List[subprocess.Popen] = []
        self.stopping = False
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:   # Ray ships this module's globals with its unit tasks: the worker
        return {}                        # gets an empty registry of its own (a lock does not pickle)

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def open(self) -> None:
        """A campaign starts: children may be started (again)."""
        with self._lock:
            self.stopping = False

    def start(self, cmd: Sequence[str], **popen_kw) -> Optional[subprocess.Popen]:
        """``Popen(cmd, **popen_kw)``, tracked; ``None`` once :meth:`stop_all` has run."""
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, **popen_kw)
            self.procs.append(proc)
            return proc

    def stop_all(self) -> None:
        """Terminate every child (kill after 15 s) and refuse new ones until :meth:`open`."""
        with self._lock:
            self.stopping = True
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


CHILDREN = _Children()


def _checkpoint_step(d: Path) -> Optional[int]:
    """The env step of a unit's last complete checkpoint, or None."""
    from synther_buffer.checkpoint import RunCheckpoint

    try:
        loaded = RunCheckpoint(d / "checkpoint").load()
    except ValueError:
        return None
    return None if loaded is None else int(loaded[1]["env_steps"])


# What a finished unit keeps in ``out`` when it ran in a separate work directory (small, committed).
RESULT_FILES = ("results.json", "eval_returns.csv")
# --dump-pool: the final synthetic pool (and its real transitions) in the work dir, the score in ``out``
POOL_FILE = "final_pool.npz"
POOL_FIDELITY_FILE = "pool_fidelity.json"


def score_pool(unit: Unit, d: Path, max_rows: int = 10_000) -> Dict[str, Any]:
    """Replay a unit's final synthetic pool (``d / POOL_FILE``) in the simulator.

    Errors are normalised by the std of the unit's own real transitions (``final_pool.real.npz``,
    every real transition of the run: ``normalization: "reference"``); the same score of up to
    ``max_rows`` real rows is the oracle's floor on this data (~0). Where scoring cannot be done (no
    pool, an env the oracle does not support, no MuJoCo) ``fidelity`` is None and ``note`` says why.
    """
    from synther_buffer.datasets import load_transitions
    from synther_buffer.extras import MissingExtraError
    from synther_buffer.sb3_run import real_pool_path

    pool, real = d / POOL_FILE, real_pool_path(d / POOL_FILE)
    out: Dict[str, Any] = {"env": unit.env, "arm": unit.arm, "seed": unit.seed, "pool_file": str(pool),
                           "real_file": str(real), "fidelity": None}
    res = _read_json(d / "results.json") or {}
    stats = res.get("buffer_stats") or {}
    for k in ("env_steps", "num_real", "num_synthetic", "retrain_count", "last_retrain_env_step",
              "last_train_loss", "last_fit_seconds"):
        if k in stats:
            out[k] = stats[k]
    cfg = (res.get("config") or {}).get("synther")
    if cfg and stats.get("last_retrain_env_step", -1) >= 0:
        from synther_buffer.config import SynthERConfig

        c = SynthERConfig.from_dict(cfg)   # one real row per env step: the last fit saw that many rows
        out["last_fit_train_steps"] = c.train_steps_for(int(stats["last_retrain_env_step"]))
        out["budget_rule"] = {k: cfg.get(k) for k in ("train_steps", "train_steps_rows", "train_steps_power",
                                                      "max_train_steps")}
    if not pool.exists() or not real.exists():
        out["note"] = f"no pool dump in {d} (run without --dump-pool, or no retrain happened)"
        return out
    try:
        from synther_buffer.oracle import score_transitions

        syn, ref = load_transitions(pool), load_transitions(real)
        out["fidelity"] = score_transitions(unit.env, syn, reference=ref, max_rows=max_rows)
        floor = score_transitions(unit.env, ref, reference=ref, max_rows=max_rows)
        out["real_floor"] = {k: floor[k] for k in ("dynamics_mse", "reward_mse", "n_scored")}
    except (MissingExtraError, ValueError) as e:   # no simulator here, or an env it cannot replay
        out["fidelity"], out["note"] = None, f"fidelity scoring skipped: {e}"
    return out


def _write_pool_fidelity(unit: Unit, d: Path, d_out: Path) -> None:
    try:
        f = score_pool(unit, d)
    except Exception as e:   # a damaged dump: the unit stays done; a rerun with --dump-pool scores again
        _log(f"{unit.key}: scoring its final pool failed: {type(e).__name__}: {e}")
        return
    d_out.mkdir(parents=True, exist_ok=True)
    _write_json(d_out / POOL_FIDELITY_FILE, f)
    fid = f.get("fidelity")
    _log(f"{unit.key}: final pool fidelity: " + (f"dynamics MSE {fid['dynamics_mse']:.4g}, reward MSE "
                                                  f"{fid['reward_mse']:.4g} ({fid['n_scored']:,} rows)"
                                                  if fid else f.get("note", "none")))


def run_unit(preset: Preset, unit: Unit, out: Path, threads: int, device: str,
             heartbeat_s: float = 300.0, keep_checkpoint: bool = False, work: Optional[Path] = None,
             dump_pool: bool = False) -> str:
    """Run ``unit`` unless done; returns ``skipped`` | ``done`` | ``failed``.

    The unit runs in ``unit.dir(work)`` (default: in ``out``); when done, its :data:`RESULT_FILES` and
    ``unit.json`` land in ``unit.dir(out)``. ``dump_pool`` (SynthER arms): the run writes its final pool
    to :data:`POOL_FILE` in its work dir and :data:`POOL_FIDELITY_FILE` (:func:`score_pool`) lands in
    ``unit.dir(out)``; a done unit without that file is scored if its work dir still has the pool.
    """
    dump_pool = dump_pool and ARMS[unit.arm].synther
    work = out if work is None else work
    d, d_out = unit.dir(work), unit.dir(out)
    status = unit_status(preset, unit, out, work)
    settings = unit_settings(preset, unit)
    if status == "done":
        _log(f"skip {unit.key}: done")
        if dump_pool and not (d_out / POOL_FIDELITY_FILE).exists() and (d / POOL_FILE).exists():
            _write_pool_fidelity(unit, d, d_out)
        return "skipped"
    if status == "running":
        raise RuntimeError(f"{unit.key}: its process {_read_json(d / RUNNING_FILE)['pid']} is still running "
                           f"(a previous benchmark's child); stop it or wait")
    if status == "stale":
        n = 1
        while d_out.with_name(f"{d_out.name}.stale-{n}").exists():
            n += 1
        d_out.rename(d_out.with_name(f"{d_out.name}.stale-{n}"))
        if d != d_out:
            shutil.rmtree(d, ignore_errors=True)   # its checkpoint belongs to the old settings
        _log(f"{unit.key}: finished with other settings; moved to {d_out.name}.stale-{n}, re-running")
    elif status == "partial":
        ckpt = _checkpoint_step(d)
        if ckpt is None:
            _log(f"{unit.key}: interrupted before its first checkpoint; re-running from scratch")
            shutil.rmtree(d)
        else:
            _log(f"{unit.key}: interrupted earlier; resuming from its checkpoint at env step {ckpt:,}")
    resuming = d.is_dir()
    d.mkdir(parents=True, exist_ok=True)
    # --checkpoint-every / --resume do not change what a unit computes: not part of its settings.
    cmd = [sys.executable, "-c", _BOOT, str(REPO / settings["script"]), *settings["args"],
           "--out", str(d), "--threads", str(threads), "--device", device, "--quiet",
           "--checkpoint-every", str(preset.eval_every or preset.total_steps), "--resume"]
    if dump_pool:   # like --out: where files go, not what the unit computes (not in its settings)
        cmd += ["--save-pool", str(d / POOL_FILE)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("MUJOCO_GL", "disable")
    _log(f"start {unit.key}: {settings['script']} {' '.join(settings['args'])}")
    t0 = time.time()
    with open(d / "stdout.log", "a" if resuming else "w") as logf:
        proc = CHILDREN.start(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        if proc is None:
            _log(f"{unit.key}: not started (the benchmark is stopping)")
            return "interrupted"
        _write_json(d / RUNNING_FILE, {"pid": proc.pid, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            next_beat = time.time() + heartbeat_s
            while proc.poll() is None:
                time.sleep(0.2)
                if time.time() >= next_beat:
                    next_beat += heartbeat_s
                    row = _last_eval(d)
                    last = (f"last eval {float(row['mean_return']):.1f} at env step {row['env_step']}"
                            if row else "no eval yet")
                    _log(f"  {unit.key}: running {time.time() - t0:.0f} s, {last}")
        finally:
            if proc.poll() is None:   # interrupted: stop the child, leave the unit partial
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            CHILDREN.procs.remove(proc)
    wall = time.time() - t0
    res = _read_json(d / "results.json")
    if CHILDREN.stopping and proc.returncode != 0:
        _log(f"{unit.key}: interrupted after {wall:.0f} s; it resumes from its last checkpoint")
        return "interrupted"
    if proc.returncode != 0 or not res or "final_eval" not in res:
        tail = (d / "stdout.log").read_text(errors="replace")[-2000:]
        _log(f"FAILED {unit.key} (exit {proc.returncode}, {wall:.0f} s); tail of stdout.log:\n{tail}")
        return "failed"
    (d / RUNNING_FILE).unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(d / "checkpoint", ignore_errors=True)
    if d != d_out:
        d_out.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            shutil.copy2(d / name, d_out / name)
    _write_json(d_out / UNIT_FILE, {"status": "done", "unit": dataclasses.asdict(unit), "preset": preset.name,
                                "settings": settings, "command": cmd[:2] + ["<boot>"] + cmd[3:],
                                "returncode": proc.returncode, "wall_seconds": round(wall, 1),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    fe = res["final_eval"]
    _log(f"done {unit.key}: final eval {fe['mean_return']:.1f} +- {fe['std_return']:.1f} "
         f"at env step {fe['env_step']:,}, {wall:.0f} s")
    if dump_pool:   # after unit.json: a failed scoring never costs the unit its done status
        _write_pool_fidelity(unit, d, d_out)
    return "done"


@contextlib.contextmanager
def _out_lock(out: Path):
    """One benchmark process per --out."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"another benchmark is running on {out} (lock {out / LOCK_FILE})") from None
    try:
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# --------------------------------------------------------------------------------------- Ray


def _ray():
    from synther_buffer.extras import require

    return require("ray", "distributed", "benchmarks.utd20 --ray")


def ray_connect(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    """Join the cluster at ``address`` (``"auto"``: the one ``RAY_ADDRESS`` or ``ray start`` names), or start
    a new local instance when ``address`` is ``None`` / ``"local"`` (``address="local"``: never a cluster
    that happens to run on this machine, e.g. one a killed process left behind). A no-op when Ray is
    already initialised."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address in (None, "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=address)


def _node_sees(path: str) -> Tuple[str, bool]:
    """(host name, whether ``path`` exists), run on one Ray node."""
    import socket
    return socket.gethostname(), os.path.exists(path)


def check_shared_path(out: Path, timeout_s: float = 60.0, probe: Callable[[str], Tuple[str, bool]] = _node_sees
                      ) -> None:
    """Raise ``RuntimeError`` unless every alive Ray node sees ``out`` (a unit may run on any of them
    and writes its files there, so ``out`` must be on a shared filesystem). ``probe`` runs on each node."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f".ray-check-{os.getpid()}-{time.time_ns()}"
    (out / token).write_text("shared?")
    remote = ray.remote(num_cpus=0)(probe)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(out / token)) for n in nodes]
        blind = [f"{host} ({n['NodeManagerAddress']})" for n, (host, ok)
                 in zip(nodes, ray.get(refs, timeout=timeout_s)) if not ok]
    finally:
        (out / token).unlink(missing_ok=True)
    if blind:
        raise RuntimeError(f"--out {out} is not visible on {len(blind)} of {len(nodes)} Ray nodes: "
                           f"{', '.join(blind)}. Units write their results there: use a path on a "
                           f"filesystem every node mounts (NFS, a shared volume)")


def _run_unit_task(*args, **kwargs) -> str:
    """The body of a unit's Ray task: :func:`run_unit` on whichever node Ray picked. A retry (after the
    worker died) finds the unit partial and resumes it from its last checkpoint."""
    return run_unit(*args, **kwargs)


def run_units_on_ray(preset: Preset, units: Sequence[Unit], out: Path, work: Path, threads: int, device: str,
                     heartbeat_s: float, keep_checkpoints: bool, cpus_per_unit: float, gpus_per_unit: float,
                     max_retries: int, dump_pool: bool = False) -> List[str]:
    """Every unit as a Ray task with declared resources; returns each unit's result in ``units``' order
    (``skipped`` | ``done`` | ``failed``). A unit whose worker died more than ``max_retries`` times is
    ``failed``; the others go on."""
    ray = _ray()
    from tqdm.auto import tqdm

    # workers import this module (and the unit's script) from the same checkout path on every node
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    task = ray.remote(_run_unit_task).options(num_cpus=cpus_per_unit, num_gpus=gpus_per_unit,
                                              max_retries=max_retries, retry_exceptions=False,
                                              runtime_env={"env_vars": env_vars})
    refs = {task.remote(preset, u, out, threads, device, heartbeat_s, keep_checkpoints, work, dump_pool): i
            for i, u in enumerate(units)}
    results: List[str] = ["failed"] * len(units)
    pending = list(refs)
    with tqdm(total=len(units), desc="utd20 units", unit="unit", file=sys.stdout) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            try:
                results[i] = ray.get(ready[0])
            except Exception as e:  # the worker died past its retries, or the task raised
                _log(f"FAILED {units[i].key} on Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                if results[i] != "skipped":
                    _log(f"{results[i]} {units[i].key} (Ray)")
            bar.update(1)
    return results


# --------------------------------------------------------------------------------------- statistics


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle 50% of all values (scipy ``trim_mean(x, 0.25)``,
    rliable's ``aggregate_iqm``): drop ``int(0.25 n)`` values from each end of the sorted data."""
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("iqm of no values")
    cut = int(0.25 * v.size)
    return float(v[cut:v.size - cut].mean())


def stratified_bootstrap_ci(scores: np.ndarray, stat: Callable[[np.ndarray], float] = iqm, reps: int = 2000,
                            alpha: float = 0.05, seed: int = 0) -> Tuple[float, float]:
    """Percentile CI of ``stat`` over a ``[runs, tasks]`` score matrix, resampling runs with replacement
    within each task (column) independently (rliable's stratified bootstrap)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [runs, tasks] matrix, got shape {scores.shape}")
    n, m = scores.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n, m))
    cols = np.arange(m)[None, None, :]
    stats = np.array([stat(scores[idx[r], cols[0]]) for r in range(reps)])
    return float(np.percentile(stats, 100 * alpha / 2)), float(np.percentile(stats, 100 * (1 - alpha / 2)))


def probability_of_improvement(x: Sequence[Sequence[float]], y: Sequence[Sequence[float]]) -> float:
    """P(X > Y) averaged over tasks (rliable's definition): for each task, the fraction of (x run, y run)
    pairs where x's score is higher, ties counting one half; then the mean over tasks.

    Args:
        x, y: per task, the runs' scores: ``x[t]`` and ``y[t]`` are sequences (their lengths may differ).
    """
    if len(x) != len(y) or not len(x):
        raise ValueError(f"x and y need the same non-zero number of tasks, got {len(x)} and {len(y)}")
    per_task = []
    for xt, yt in zip(x, y):
        a, b = np.asarray(xt, dtype=np.float64)[:, None], np.asarray(yt, dtype=np.float64)[None, :]
        if a.size == 0 or b.size == 0:
            raise ValueError("every task needs at least one run of each arm")
        per_task.append(float(np.mean((a > b) + 0.5 * (a == b))))
    return float(np.mean(per_task))


def probability_of_improvement_ci(x, y, reps: int = 2000, alpha: float = 0.05, seed: int = 0
                                  ) -> Tuple[float, float]:
    """Percentile CI of :func:`probability_of_improvement`, resampling each arm's runs with replacement
    within each task (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    xs = [np.asarray(t, dtype=np.float64) for t in x]
    ys = [np.asarray(t, dtype=np.float64) for t in y]
    stats = [probability_of_improvement([t[rng.integers(0, t.size, t.size)] for t in xs],
                                        [t[rng.integers(0, t.size, t.size)] for t in ys]) for _ in range(reps)]
    return float(np.percentile(stats, 100 * alpha / 2)), float(np.percentile(stats, 100 * (1 - alpha / 2)))


def _rliable():
    try:
        from rliable import library as rly
        from rliable import metrics
        return rly, metrics
    except Exception:  # not installed, or a broken dependency (arch / statsmodels)
        return None


def aggregate_scores(score_dict: Dict[str, np.ndarray], reps: int = 2000, use_rliable: Optional[bool] = None
                     ) -> Dict[str, Dict[str, Any]]:
    """IQM and mean with 95% stratified-bootstrap CIs per arm, from ``{arm: [runs, tasks]}`` normalised scores.

    Uses ``rliable`` when importable (``use_rliable=None``/True), else :func:`iqm` and
    :func:`stratified_bootstrap_ci`; the result names the backend.
    """
    lib = _rliable() if use_rliable in (None, True) else None
    if use_rliable and lib is None:
        raise ImportError("rliable is not importable")
    out: Dict[str, Dict[str, Any]] = {}
    if lib is not None:
        rly, metrics = lib
        fn = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])  # noqa: E731
        np.random.seed(0)
        point, ci = rly.get_interval_estimates({k: np.asarray(v, float) for k, v in score_dict.items()}, fn,
                                               reps=reps)
        for k in score_dict:
            out[k] = {"iqm": float(point[k][0]), "iqm_ci": [float(ci[k][0, 0]), float(ci[k][1, 0])],
                      "mean": float(point[k][1]), "mean_ci": [float(ci[k][0, 1]), float(ci[k][1, 1])],
                      "runs": int(np.shape(score_dict[k])[0]), "tasks": int(np.shape(score_dict[k])[1]),
                      "backend": "rliable"}
        return out
    for k, v in score_dict.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = {"iqm": iqm(v), "iqm_ci": list(stratified_bootstrap_ci(v, iqm, reps)),
                  "mean": float(v.mean()), "mean_ci": list(stratified_bootstrap_ci(v, lambda a: float(a.mean()), reps)),
                  "runs": int(v.shape[0]), "tasks": int(v.shape[1]), "backend": "numpy"}
    return out


def normaliser(env: str, all_returns: Sequence[float]) -> Tuple[Callable[[float], float], str]:
    """``(f, how)``: maps a raw return of ``env`` to a normalised score."""
    base = env.split("/")[-1]
    name = re.sub(r"-v\d+$", "", base)
    if env.startswith("dm_control/") or ("/" not in env and not re.search(r"-v\d+$", env)):
        return (lambda r: r / 1000.0), "DMC: return / 1000"
    if name in GYM_REFERENCE:
        lo, hi = GYM_REFERENCE[name]
        return (lambda r: (r - lo) / (hi - lo)), f"D4RL reference ({lo:g}, {hi:g})"
    lo, hi = float(np.min(all_returns)), float(np.max(all_returns))
    span = hi - lo if hi > lo else 1.0
    return (lambda r: (r - lo) / span), f"min-max over its runs ({lo:.1f}, {hi:.1f})"


# --------------------------------------------------------------------------------------- report

TIMING_KEYS = ("total", "rl", "diffusion_fit", "diffusion_sample", "eval", "setup")

# The report's steadier second statistic: the mean of a run's last LATE_EVALS evaluations (at the cpu
# preset 8K / 9K / 10K env steps, 15 episodes) beside the final evaluation's 5 episodes alone.
LATE_EVALS = 3


def late_return(evals: Sequence[Tuple[int, float]], k: int = LATE_EVALS) -> float:
    """Mean return of the last ``k`` evaluations (``(env_step, mean_return)`` in step order; all if fewer)."""
    if not evals:
        raise ValueError("a finished unit has at least its final evaluation")
    return float(np.mean([r for _, r in sorted(evals)[-k:]]))


def collect(out: Path, work: Optional[Path] = None) -> Dict[str, Any]:
    """Finished units under ``out`` and in-progress ones under ``out`` and ``work`` (whatever preset wrote them)."""
    done: List[Dict[str, Any]] = []
    partial: List[Dict[str, Any]] = []
    for marker in sorted(Path(out).glob(f"*/*/seed*/{UNIT_FILE}")):
        d = marker.parent
        if not re.fullmatch(r"seed\d+", d.name):
            continue
        m, res = _read_json(marker), _read_json(d / "results.json")
        if not m or m.get("status") != "done" or not res or "final_eval" not in res:
            continue
        done.append({"env": m["unit"]["env"], "arm": m["unit"]["arm"], "seed": m["unit"]["seed"],
                     "dir": str(d), "settings": m["settings"], "unit_wall_seconds": m.get("wall_seconds"),
                     "evals": [(r["env_step"], r["mean_return"]) for r in res.get("evals", [])],
                     "final_return": res["final_eval"]["mean_return"], "final_step": res["final_eval"]["env_step"],
                     "late_return": late_return([(r["env_step"], r["mean_return"]) for r in res.get("evals", [])]
                                                or [(res["final_eval"]["env_step"], res["final_eval"]["mean_return"])]),
                     "timing": res.get("timing_seconds", {}), "retrains": res.get("retrain_count", 0),
                     "utd": _flag(m["settings"].get("args", []), "--utd"),
                     "pool_fidelity": _read_json(d / POOL_FIDELITY_FILE)})
    done_keys = {(Path(u["dir"]).parent.parent.name, u["arm"], u["seed"]) for u in done}
    roots = [Path(out)] + ([Path(work)] if work is not None and Path(work) != Path(out) else [])
    for d in sorted(d for root in roots for d in root.glob("*/*/seed*")):
        if (not d.is_dir() or not re.fullmatch(r"seed\d+", d.name)
                or (d.parent.parent.name, d.parent.name, int(d.name[4:])) in done_keys):
            continue
        row = _last_eval(d)
        res = _read_json(d / "results.json") or {}
        cfg = res.get("config", {})
        running = _read_json(d / RUNNING_FILE) or {}
        partial.append({"dir": str(d), "env": cfg.get("env", d.parent.parent.name), "arm": d.parent.name,
                        "seed": int(d.name[4:]), "total_steps": cfg.get("total_steps"),
                        "alive": bool(running) and _pid_alive(running.get("pid", -1))
                        and _cmdline_mentions(running["pid"], str(d)),
                        "last_eval_step": int(row["env_step"]) if row else None,
                        "last_eval_return": float(row["mean_return"]) if row else None,
                        "evals": [(r["env_step"], r["mean_return"]) for r in res.get("evals", [])]})
    return {"done": done, "partial": partial}


def _flag(args: Sequence[str], name: str) -> Optional[str]:
    args = list(args)
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def _label(arm: str, utd: Optional[str]) -> str:
    """The arm's display label with the UTD the units actually ran (the smoke preset scales it down)."""
    label = ARMS[arm].label if arm in ARMS else arm
    return re.sub(r"UTD=\d+", f"UTD={utd}", label) if utd else label


def _arm_order(arms) -> List[str]:
    order = list(ARMS)
    return sorted(set(arms), key=lambda a: (order.index(a) if a in order else len(order), a))


def _fmt(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _plot_env(env: str, units: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for arm in _arm_order(u["arm"] for u in units):
        runs = [dict(u["evals"]) for u in units if u["arm"] == arm]
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if not steps:
            continue
        y = np.array([[r[s] for s in steps] for r in runs])
        mean = y.mean(0)
        sd = y.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        utds = {u["utd"] for u in units if u["arm"] == arm}
        label = f"{_label(arm, utds.pop() if len(utds) == 1 else None)} (n={len(runs)})"
        line, = ax.plot(steps, mean, marker="o", ms=3, label=label)
        if len(runs) > 1:
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return")
    ax.set_title(f"{env}: mean over seeds, shaded +- 1 std", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# A report section: its JSON records, then its table (header, rows) for summary.md and the CSVs.
Section = Tuple[Any, List[str], List[List[Any]]]


def _final_returns(done: List[Dict[str, Any]], envs: List[str], arms: List[str]) -> Section:
    """Final return (and the mean of the last evaluations) per env x arm: mean, std over seeds, each seed's."""
    records, rows = [], []
    for env in envs:
        for arm in arms:
            us = sorted((u for u in done if u["env"] == env and u["arm"] == arm), key=lambda u: u["seed"])
            if not us:
                continue
            v, late = (np.array([u[k] for u in us]) for k in ("final_return", "late_return"))
            sd, late_sd = (float(x.std(ddof=1)) if x.size > 1 else float("nan") for x in (v, late))
            steps = sorted({u["final_step"] for u in us})
            records.append({"env": env, "arm": arm, "mean": float(v.mean()), "std": sd, "n": int(v.size),
                            "env_steps": steps, "per_seed": {str(u["seed"]): u["final_return"] for u in us},
                            "late": {"mean": float(late.mean()), "std": late_sd, "n": int(late.size),
                                     "per_seed": {str(u["seed"]): u["late_return"] for u in us}}})
            paper = PAPER_100K.get(env.split("/")[-1].removesuffix("-v0"), {}).get(arm)
            rows.append([env, arm, f"{v.mean():.1f}", _fmt(sd), v.size, "/".join(map(str, steps)),
                         " ".join(f"{r:.1f}" for r in v), f"{late.mean():.1f}",
                         " ".join(f"{r:.1f}" for r in late), paper if paper else "-"])
    header = ["env", "arm", "final return (mean)", "std over seeds", "seeds", "env steps", "per seed",
              f"mean of last {LATE_EVALS} evals", "per seed (last evals)", "published, 100K steps"]
    return records, header, rows


def _timing_split(done: List[Dict[str, Any]], arms: List[str]) -> Section:
    """Wall-clock split per arm (means over its units), with the diffusion share and env steps per second."""
    records, rows = [], []
    for arm in arms:
        us = [u for u in done if u["arm"] == arm]
        t = {k: float(np.mean([u["timing"].get(k, 0.0) for u in us])) for k in TIMING_KEYS}
        steps = float(np.mean([u["final_step"] for u in us]))
        t["env_steps_per_s"] = steps / t["total"] if t["total"] > 0 else float("nan")
        t["diffusion_share"] = (t["diffusion_fit"] + t["diffusion_sample"]) / t["total"] if t["total"] else 0.0
        t["retrains"] = float(np.mean([u["retrains"] for u in us]))
        records.append({"arm": arm, "units": len(us), **t})
        rows.append([arm, len(us), f"{t['total']:.0f}", f"{t['rl']:.0f}", f"{t['diffusion_fit']:.0f}",
                     f"{t['diffusion_sample']:.0f}", f"{t['eval']:.0f}", f"{t['setup']:.0f}",
                     f"{100 * t['diffusion_share']:.1f}%", f"{t['retrains']:.1f}", f"{t['env_steps_per_s']:.2f}"])
    header = ["arm", "units", "total s", "RL s", "diffusion training s", "diffusion sampling s",
              "eval s", "setup s", "diffusion share", "retrains", "env steps/s"]
    return records, header, rows


def _aggregate(done: List[Dict[str, Any]], envs: List[str], arms: List[str], reps: int
               ) -> Tuple[Dict[str, Any], Dict[str, str], List[str], List[List[Any]]]:
    """IQM and mean of normalised final returns over envs with stratified-bootstrap CIs, for the arms with
    units on every env (2+ envs); also each env's normalisation in words."""
    records: Dict[str, Any] = {}
    rows: List[List[Any]] = []
    norms: Dict[str, str] = {}
    header = ["arm", "runs", "tasks", "IQM", "IQM 95% CI", "mean", "mean 95% CI", "backend"]
    if len(envs) < 2:
        return records, norms, header, rows
    score_dict = {}
    for arm in arms:
        cols = []
        for env in envs:
            f, how = normaliser(env, [u["final_return"] for u in done if u["env"] == env])
            norms[env] = how
            cols.append([f(u["final_return"]) for u in sorted(done, key=lambda u: u["seed"])
                         if u["env"] == env and u["arm"] == arm])
        if min(len(c) for c in cols) == 0:
            continue  # this arm lacks an env: no aggregate for it
        k = min(len(c) for c in cols)  # a rectangular [runs, tasks] matrix: the first k seeds of each env
        score_dict[arm] = np.array([c[:k] for c in cols]).T
    if score_dict:
        records = aggregate_scores(score_dict, reps=reps)
        for arm, a in records.items():
            rows.append([arm, a["runs"], a["tasks"], f"{a['iqm']:.3f}", f"[{a['iqm_ci'][0]:.3f}, {a['iqm_ci'][1]:.3f}]",
                         f"{a['mean']:.3f}", f"[{a['mean_ci'][0]:.3f}, {a['mean_ci'][1]:.3f}]", a["backend"]])
    return records, norms, header, rows


def _improvement(done: List[Dict[str, Any]], envs: List[str], reps: int) -> Section:
    """Probability of improvement of SynthER over each baseline, on the envs both arms finished."""
    records, rows = [], []
    for base in ("sac_utd20", "redq_utd20"):
        both = [e for e in envs if any(u["env"] == e and u["arm"] == "synther_utd20" for u in done)
                and any(u["env"] == e and u["arm"] == base for u in done)]
        if not both:
            continue
        runs = lambda arm: [[u["final_return"] for u in done if u["env"] == e and u["arm"] == arm]  # noqa: E731
                            for e in both]
        x, y = runs("synther_utd20"), runs(base)
        p_hat, ci = probability_of_improvement(x, y), probability_of_improvement_ci(x, y, reps=reps)
        records.append({"x": "synther_utd20", "y": base, "envs": both, "poi": p_hat, "ci": list(ci)})
        rows.append([f"synther_utd20 > {base}", ", ".join(both), f"{p_hat:.2f}", f"[{ci[0]:.2f}, {ci[1]:.2f}]"])
    return records, ["P(X > Y)", "envs", "estimate", "95% CI"], rows


def _pool_fidelity(done: List[Dict[str, Any]], arms: List[str]) -> Section:
    """The final synthetic pool's simulator fidelity of each unit run with --dump-pool."""
    records, rows = [], []
    for u in sorted(done, key=lambda u: (u["env"], arms.index(u["arm"]), u["seed"])):
        pf = u.get("pool_fidelity")
        if not isinstance(pf, dict):
            continue
        fid, floor = pf.get("fidelity") or {}, pf.get("real_floor") or {}
        records.append({"env": u["env"], "arm": u["arm"], "seed": u["seed"], "final_return": u["final_return"],
                        **{k: v for k, v in pf.items() if k not in ("env", "arm", "seed")}})
        rows.append([u["env"], u["arm"], u["seed"], f"{u['final_return']:.1f}",
                     pf.get("last_retrain_env_step", "-"), pf.get("last_fit_train_steps", "-"),
                     (f"{fid['dynamics_mse']:.4f} +- {fid.get('dynamics_mse_se', float('nan')):.4f}"
                      if fid else pf.get("note", "-")),
                     (f"{fid['reward_mse']:.4f} +- {fid.get('reward_mse_se', float('nan')):.4f}" if fid else "-"),
                     _fmt(floor.get("dynamics_mse"), 4), fid.get("n_scored", "-") if fid else "-"])
    header = ["env", "arm", "seed", "final return", "last retrain at", "its diffusion steps",
              "dynamics MSE (+- se)", "reward MSE (+- se)", "real rows' MSE (floor)", "rows scored"]
    return records, header, rows


def write_report(out: Path, reps: int = 2000, work: Optional[Path] = None) -> Dict[str, Any]:
    """Tables, plots and aggregates from the units under ``out``; returns the summary dict.

    Writes ``summary.md`` / ``summary.json``, ``final_returns.{md,csv}``, ``timing.csv``, ``aggregate.csv``
    and one ``curves_<env>.png`` per env into ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = collect(out, work)
    done = data["done"]
    envs = sorted({u["env"] for u in done})
    arms = _arm_order(u["arm"] for u in done)
    final_json, final_header, final_rows = _final_returns(done, envs, arms)
    timing_json, timing_header, timing_rows = _timing_split(done, arms)
    agg_json, norms, agg_header, agg_rows = _aggregate(done, envs, arms, reps)
    poi_json, poi_header, poi_rows = _improvement(done, envs, reps)
    pool_json, pool_header, pool_rows = _pool_fidelity(done, arms)

    # Plots.
    pngs = []
    for env in envs:
        p = out / f"curves_{env_dirname(env)}.png"
        _plot_env(env, [u for u in done if u["env"] == env], p)
        pngs.append(p.name)

    # Files.
    _write_csv(out / "final_returns.csv", final_header, final_rows)
    _write_csv(out / "timing.csv", timing_header, timing_rows)
    _write_csv(out / "aggregate.csv", agg_header, agg_rows)
    final_md = md_table(final_header, final_rows) if final_rows else "(no finished units yet)"
    (out / "final_returns.md").write_text("# Final eval return\n\n" + final_md + "\n")
    md = [f"# UTD=20 benchmark: {_shown(out)}", "", f"{len(done)} finished units, {len(data['partial'])} unfinished.", "",
          "## Final eval return (mean over seeds of each run's final evaluation)", "", final_md, "",
          "## Wall-clock split per arm (seconds, mean per unit)", "",
          md_table(timing_header, timing_rows) if timing_rows else "(none)", ""]
    if agg_rows:
        md += ["## Aggregate over envs (normalised final return; 95% stratified bootstrap CI)", "",
               md_table(agg_header, agg_rows), "",
               "Normalisation: " + "; ".join(f"{e}: {h}" for e, h in norms.items()), ""]
    else:
        md += ["## Aggregate over envs", "", "(needs finished units on 2+ envs)", ""]
    if poi_rows:
        md += ["## Probability of improvement (final return; per env over all run pairs, averaged over envs; "
               "95% stratified bootstrap CI)", "", md_table(poi_header, poi_rows), ""]
    md += ["How to read this: with 2-3 seeds per arm, only an effect several times the seed-to-seed spread "
           "is distinguishable, and a CI from 2-3 runs per task is itself rough. 10K env steps is the early, "
           "small-buffer regime where UTD=20 overfits most; it says nothing about 100K-step returns. The "
           "published 100K numbers are for orientation only (10x the budget, other code and hardware).", ""]
    if pool_rows:
        md += ["## Final synthetic pool fidelity (--dump-pool: the last pool replayed in the simulator; errors "
               "in units of the std of the unit's own real transitions, lower is better)", "",
               md_table(pool_header, pool_rows), ""]
    if data["partial"]:
        prow = [[p["env"], p["arm"], p["seed"], "running" if p["alive"] else "interrupted",
                 p["last_eval_step"] if p["last_eval_step"] is not None else "-",
                 _fmt(p["last_eval_return"]), p["total_steps"] or "-"] for p in data["partial"]]
        md += ["## Unfinished units (not in the tables; an interrupted one resumes from its last checkpoint)", "",
               md_table(["env", "arm", "seed", "state", "last eval step", "last eval return", "of steps"], prow), ""]
    md += ["## Curves", ""] + [f"![{p}]({p})" for p in pngs]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    summary = {"out": str(out), "final_returns": final_json, "timing": timing_json, "aggregate": agg_json,
               "probability_of_improvement": poi_json, "pool_fidelity": pool_json,
               "normalisation": norms, "pngs": pngs,
               "units": [{k: u[k] for k in ("env", "arm", "seed", "dir", "final_return", "final_step",
                                            "unit_wall_seconds", "timing", "retrains", "settings")} for u in done],
               "unfinished": [{k: v for k, v in p.items() if k != "evals"} | {"evals": p["evals"]}
                              for p in data["partial"]]}
    _write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from synther_buffer.config import PRECISIONS  # here: the package imports torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.utd20", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--envs", nargs="+", default=None, help="env ids (default: the preset's)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the preset's)")
    p.add_argument("--out", default=None,
                   help="results root (default: the preset's, benchmarks/results/cpu for cpu)")
    p.add_argument("--work", default=None,
                   help="where units run: checkpoints, logs (default: the preset's, "
                        "~/.cache/synther_buffer/utd20/cpu for cpu, else --out)")
    p.add_argument("--total-steps", type=int, default=None,
                   help="override the preset's env steps per run; without --out / --work the units run under "
                        "roots of their own (the preset's + _<N>steps), never beside the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 on shared CPUs)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', 'auto' (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the SynthER arms' diffusion matmul precision (default: the preset's, fp32; "
                        "bf16 pays on GPUs and AVX512-BF16 CPUs). Part of a unit's settings: a finished "
                        "unit run in the other precision counts as stale and is re-run")
    p.add_argument("--jobs", type=int, default=1, help="units run at once (without --ray)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each unit as a Ray task: no ADDRESS starts a local Ray instance, 'auto' joins the "
                        "cluster in RAY_ADDRESS, else the cluster at ADDRESS. --out must be visible on every node")
    p.add_argument("--cpus-per-unit", type=float, default=1.0, help="Ray: CPUs a unit reserves")
    p.add_argument("--gpus-per-unit", type=float, default=0.0,
                   help="Ray: GPUs a unit reserves (fractions let several units share one GPU)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="Ray: times a unit whose worker died is retried (from its checkpoint)")
    p.add_argument("--dump-pool", action="store_true",
                   help="SynthER units write their final synthetic pool (final_pool.npz, with its real "
                        "transitions) into their work dir and score it with the simulator oracle into "
                        "pool_fidelity.json beside their results (not part of a unit's settings)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished unit's checkpoint/ (its final agent and buffer; default: delete)")
    p.add_argument("--report-only", action="store_true", help="only write the report from finished units")
    p.add_argument("--no-docs", action="store_true",
                   help="leave README.md / benchmarks/UTD20.md alone (by default the report rewrites their "
                        "generated block when --out is the preset's own results root)")
    p.add_argument("--dry-run", action="store_true", help="print the units, their status and commands")
    p.add_argument("--heartbeat", type=float, default=300.0, help="seconds between progress lines per unit")
    p.add_argument("--bootstrap-reps", type=int, default=2000, help="stratified bootstrap resamples")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.total_steps is not None:
        if args.total_steps <= preset.learning_starts:
            raise SystemExit(f"--total-steps must exceed the preset's learning starts ({preset.learning_starts})")
        if args.total_steps != preset.total_steps:   # own default roots: never stale-move the preset's units
            suffix = f"_{args.total_steps}steps"
            preset = dataclasses.replace(preset, default_out=preset.default_out + suffix, default_work=(
                None if preset.default_work is None else preset.default_work + suffix))
        preset = dataclasses.replace(preset, total_steps=args.total_steps)
    if args.precision is not None:  # the SynthER arms only: unit_args passes it as --precision
        preset = dataclasses.replace(preset, synther_overrides={**preset.synther_overrides,
                                                                "precision": args.precision})
    out = _root(args.out, preset.default_out)
    work = _root(args.work, preset.default_work) if (args.work or (preset.default_work and not args.out)) else out
    if args.report_only:
        s = write_report(out, reps=args.bootstrap_reps, work=work)
        print((out / "summary.md").read_text())
        if not args.no_docs:
            _update_docs(preset, out, s, total_steps=args.total_steps)
        return 0 if s["units"] else 1
    envs = list(args.envs or preset.envs)
    arms = list(args.arms or preset.arms)
    units = plan(preset, envs, arms, args.seeds)
    units = resume_first(units, [unit_status(preset, u, out, work) for u in units])
    seeds = max((u.seed for u in units), default=-1) + 1
    device = args.device or preset.device
    if {"synther_utd20", "synther_utd20_fixed"} <= set(arms) and envs:
        same = [unit_settings(preset, Unit(envs[0], a, 0))["synther_config"]
                for a in ("synther_utd20", "synther_utd20_fixed")]
        if same[0] == same[1]:   # on stderr: --dry-run's stdout is one line per unit
            print(f"note: the {preset.synther_preset!r} SynthER preset has no data-size budget rule "
                  "(train_steps_rows=None): synther_utd20 and synther_utd20_fixed train the same diffusion "
                  "budget, so they are the same run", file=sys.stderr, flush=True)
    if args.dry_run:
        print(f"out {out}\nwork {work}", file=sys.stderr, flush=True)
        for u in units:
            print(f"{unit_status(preset, u, out, work):8s} {u.key}: {ARMS[u.arm].script} "
                  f"{' '.join(unit_args(preset, u))}")
        return 0
    failed = 0
    with _out_lock(out):
        _log(f"utd20 preset {preset.name}: {len(units)} units ({len(envs)} envs x {len(arms)} arms, up to {seeds} seeds), "
             f"{preset.total_steps:,} env steps each, out {out}, work {work}, pid {os.getpid()}")
        statuses = [unit_status(preset, u, out, work) for u in units]
        todo, resumed = sum(s != "done" for s in statuses), statuses.count("partial")
        _log(f"{len(units) - todo} done already, {todo} to run"
             + (f" ({resumed} interrupted earlier: they run first)" if resumed else ""))
        t0 = time.time()
        CHILDREN.open()
        try:
            run = lambda u: run_unit(preset, u, out, args.threads, device, args.heartbeat,  # noqa: E731
                                     args.keep_checkpoints, work, args.dump_pool)
            if args.ray is not None:
                ray_connect(args.ray)
                check_shared_path(out)
                results = run_units_on_ray(preset, units, out, work, args.threads, device, args.heartbeat,
                                           args.keep_checkpoints, args.cpus_per_unit, args.gpus_per_unit,
                                           args.max_retries, args.dump_pool)
            elif args.jobs <= 1:
                results = [run(u) for u in units]
            else:
                with ThreadPoolExecutor(args.jobs) as pool:
                    try:
                        results = list(pool.map(run, units))
                    except BaseException:   # Ctrl-C / SIGTERM: stop the children now, or leaving this
                        CHILDREN.stop_all()  # block waits for their threads, i.e. for whole units
                        raise
            failed = results.count("failed")
            _log(f"all units processed in {time.time() - t0:.0f} s: {results.count('done')} run, "
                 f"{results.count('skipped')} skipped, {failed} failed")
        finally:
            CHILDREN.stop_all()
            try:
                s = write_report(out, reps=args.bootstrap_reps, work=work)
                _log(f"report: {out / 'summary.md'}")
                if not args.no_docs:
                    _update_docs(preset, out, s, total_steps=args.total_steps)
            except Exception as e:  # never mask the run's own error
                _log(f"report failed: {e!r}")
    return 1 if failed else 0


DOCS = (REPO / "README.md", REPO / "benchmarks" / "UTD20.md")


def _update_docs(preset: Preset, out: Path, summary: Dict[str, Any], total_steps: Optional[int] = None,
                 docs: Sequence[Path] = DOCS) -> List[Path]:
    """Rewrites the docs' generated block for ``preset`` (``<!-- utd20:<root name> begin -->`` ...) from
    ``summary``, when ``out`` is the preset's own results root in this checkout (a campaign writing
    elsewhere leaves the docs alone). Returns the files changed."""
    own = _root(None, preset.default_out)
    if out.resolve() != own.resolve():
        return []
    steps = "" if total_steps in (None, PRESETS[preset.name].total_steps) else f" --total-steps {total_steps}"
    command = f"python -m benchmarks.utd20 --preset {preset.name}{steps} --report-only"
    planned: Dict[Tuple[str, str], int] = {}
    if not steps:
        for u in plan(preset, preset.envs, preset.arms):
            planned[(u.env, u.arm)] = planned.get((u.env, u.arm), 0) + 1
    labels = {name: arm.label for name, arm in ARMS.items()}
    changed = update_docs(docs, f"utd20:{own.name}", lambda doc: render_block(
        summary, planned, labels, PAPER_100K, out, doc, command))
    for doc in changed:
        _log(f"updated the generated block in {_shown(doc)}")
    return changed


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it: a committed report names no machine's paths."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _root(given: Optional[str], default: Optional[str]) -> Path:
    """A results/work root: ``given`` relative to the current directory, else the preset's ``default``
    (``~`` expanded, relative to the repository)."""
    if given:
        return Path(given).expanduser().absolute()
    p = Path(default).expanduser()
    return p if p.is_absolute() else REPO / p


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by killing the process
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        _log(f"interrupted ({e}); finished units are kept, the running one resumes from its last checkpoint")
        sys.exit(130)
