"""What a UTD=20 campaign runs: arms, presets, units, and each unit's settings and status on disk."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = "unit.json"
RUNNING_FILE = "running.json"

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
    # REDQ's critics with SAC's actor/temperature schedule (20 updates per env step): separates REDQ's
    # ensemble from its once-per-env-step temperature, which barely moves in 10K env steps (opt-in).
    Arm("redq_utd20_pu20", "REDQ (UTD=20, 20 actor updates per env step)", "integrations/custom_sac.py",
        high_utd=True, synther=False, extra=("--num-q", "10", "--num-min", "2", "--policy-updates", "20")),
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


def read_json(path: Path) -> Optional[dict]:
    """The JSON in ``path``, or None when it is missing or unreadable (a unit file being written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file, then a rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def unit_status(preset: Preset, unit: Unit, out: Path, work: Optional[Path] = None) -> str:
    """``done`` | ``stale`` (done, other settings) | ``running`` (its child is alive) | ``partial`` | ``todo``.

    Done-ness is read from ``out`` (the results); a run in progress from ``work`` (default ``out``).
    """
    marker = read_json(unit.dir(out) / UNIT_FILE)
    if marker and marker.get("status") == "done":
        return "done" if settings_match(marker.get("settings"), unit_settings(preset, unit)) else "stale"
    d = unit.dir(work if work is not None else out)
    if not d.exists():
        return "todo"
    running = read_json(d / RUNNING_FILE)
    if running and pid_alive(running.get("pid", -1)) and cmdline_mentions(running["pid"], str(d)):
        return "running"
    return "partial"


def cmdline_mentions(pid: int, text: str) -> bool:
    """Whether process ``pid``'s command line contains ``text`` (a recycled pid is another program)."""
    try:
        return text in Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid


def last_eval(d: Path) -> Optional[Dict[str, str]]:
    """The last row of a unit directory's ``eval_returns.csv``, or None before its first evaluation."""
    try:
        with open(d / "eval_returns.csv") as f:
            rows = list(csv.DictReader(f))
        return rows[-1] if rows else None
    except OSError:
        return None


# What a finished unit keeps in ``out`` when it ran in a separate work directory (small, committed).
RESULT_FILES = ("results.json", "eval_returns.csv")
# --dump-pool: the final synthetic pool (and its real transitions) in the work dir, the score in ``out``
POOL_FILE = "final_pool.npz"
POOL_FIDELITY_FILE = "pool_fidelity.json"


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it: a committed report names no machine's paths."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
