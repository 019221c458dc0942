"""Running a campaign's units: each as a child process of its integration script (resumed from its
checkpoint, its small results copied out, its final pool scored), one or several at a time or as Ray tasks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .units import (ARMS, POOL_FIDELITY_FILE, POOL_FILE, REPO, RESULT_FILES, RUNNING_FILE, UNIT_FILE, Preset,
                    Unit, last_eval, read_json, unit_settings, unit_status, write_json)

LOCK_FILE = ".lock"

# The child sets PR_SET_PDEATHSIG (SIGTERM when this process dies; survives into the script) and runs it.
_BOOT = ("import sys, runpy\n"
         "try:\n"
         "    import ctypes, signal; ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
         "except Exception:\n"
         "    pass\n"
         "sys.argv = sys.argv[1:]\n"
         "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


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
    res = read_json(d / "results.json") or {}
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
        log(f"{unit.key}: scoring its final pool failed: {type(e).__name__}: {e}")
        return
    d_out.mkdir(parents=True, exist_ok=True)
    write_json(d_out / POOL_FIDELITY_FILE, f)
    fid = f.get("fidelity")
    log(f"{unit.key}: final pool fidelity: " + (f"dynamics MSE {fid['dynamics_mse']:.4g}, reward MSE "
                                                  f"{fid['reward_mse']:.4g} ({fid['n_scored']:,} rows)"
                                                  if fid else f.get("note", "none")))


def run_unit(preset: Preset, unit: Unit, out: Path, threads: int, device: str,
             heartbeat_s: float = 300.0, keep_checkpoint: bool = False, work: Optional[Path] = None,
             dump_pool: bool = False) -> str:
    """Run ``unit`` unless done; returns ``skipped`` | ``done`` | ``failed`` | ``interrupted``.

    The unit runs in ``unit.dir(work)`` (default: in ``out``); when done, its :data:`RESULT_FILES` and
    ``unit.json`` land in ``unit.dir(out)``. ``dump_pool`` (SynthER arms): the run writes its final pool
    to :data:`POOL_FILE` in its work dir and :data:`POOL_FIDELITY_FILE` (:func:`score_pool`) lands in
    ``unit.dir(out)``; a done unit without that file is scored if its work dir still has the pool.
    """
    dump_pool = dump_pool and ARMS[unit.arm].synther
    work = out if work is None else work
    d, d_out = unit.dir(work), unit.dir(out)
    status = unit_status(preset, unit, out, work)
    if status == "done":
        log(f"skip {unit.key}: done")
        if dump_pool and not (d_out / POOL_FIDELITY_FILE).exists() and (d / POOL_FILE).exists():
            _write_pool_fidelity(unit, d, d_out)
        return "skipped"
    if status == "running":
        raise RuntimeError(f"{unit.key}: its process {read_json(d / RUNNING_FILE)['pid']} is still running "
                           f"(a previous benchmark's child); stop it or wait")
    _prepare_rerun(unit, status, d, d_out)
    resuming = d.is_dir()
    d.mkdir(parents=True, exist_ok=True)
    settings = unit_settings(preset, unit)
    cmd, env = _unit_command(preset, settings, d, threads, device, dump_pool)
    log(f"start {unit.key}: {settings['script']} {' '.join(settings['args'])}")
    t0 = time.time()
    with open(d / "stdout.log", "a" if resuming else "w") as logf:
        proc = CHILDREN.start(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        if proc is None:
            log(f"{unit.key}: not started (the benchmark is stopping)")
            return "interrupted"
        _watch(proc, unit, d, heartbeat_s)
    wall = time.time() - t0
    res = read_json(d / "results.json")
    if CHILDREN.stopping and proc.returncode != 0:
        log(f"{unit.key}: interrupted after {wall:.0f} s; it resumes from its last checkpoint")
        return "interrupted"
    if proc.returncode != 0 or not res or "final_eval" not in res:
        tail = (d / "stdout.log").read_text(errors="replace")[-2000:]
        log(f"FAILED {unit.key} (exit {proc.returncode}, {wall:.0f} s); tail of stdout.log:\n{tail}")
        return "failed"
    _record_done(preset, unit, settings, cmd, proc.returncode, wall, d, d_out, keep_checkpoint)
    fe = res["final_eval"]
    log(f"done {unit.key}: final eval {fe['mean_return']:.1f} +- {fe['std_return']:.1f} "
        f"at env step {fe['env_step']:,}, {wall:.0f} s")
    if dump_pool:   # after unit.json: a failed scoring never costs the unit its done status
        _write_pool_fidelity(unit, d, d_out)
    return "done"


def _prepare_rerun(unit: Unit, status: str, d: Path, d_out: Path) -> None:
    """Make a not-done unit's directories ready to run: a ``stale`` result (other settings) moves aside to
    ``seed<k>.stale-<n>`` with its work dir dropped; a ``partial`` one keeps its checkpoint to resume from,
    or starts over when it has none."""
    if status == "stale":
        n = 1
        while d_out.with_name(f"{d_out.name}.stale-{n}").exists():
            n += 1
        d_out.rename(d_out.with_name(f"{d_out.name}.stale-{n}"))
        if d != d_out:
            shutil.rmtree(d, ignore_errors=True)   # its checkpoint belongs to the old settings
        log(f"{unit.key}: finished with other settings; moved to {d_out.name}.stale-{n}, re-running")
    elif status == "partial":
        ckpt = _checkpoint_step(d)
        if ckpt is None:
            log(f"{unit.key}: interrupted before its first checkpoint; re-running from scratch")
            shutil.rmtree(d)
        else:
            log(f"{unit.key}: interrupted earlier; resuming from its checkpoint at env step {ckpt:,}")


def _unit_command(preset: Preset, settings: Dict[str, Any], d: Path, threads: int, device: str,
                  dump_pool: bool) -> Tuple[List[str], Dict[str, str]]:
    """The child's command line and environment: the unit's script and flags, writing into ``d``,
    checkpointing every evaluation and resuming from the last checkpoint."""
    # --checkpoint-every / --resume do not change what a unit computes: not part of its settings.
    cmd = [sys.executable, "-c", _BOOT, str(REPO / settings["script"]), *settings["args"],
           "--out", str(d), "--threads", str(threads), "--device", device, "--quiet",
           "--checkpoint-every", str(preset.eval_every or preset.total_steps), "--resume"]
    if dump_pool:   # like --out: where files go, not what the unit computes (not in its settings)
        cmd += ["--save-pool", str(d / POOL_FILE)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("MUJOCO_GL", "disable")
    return cmd, env


def _watch(proc: subprocess.Popen, unit: Unit, d: Path, heartbeat_s: float) -> None:
    """Wait for a unit's child, logging its latest evaluation every ``heartbeat_s``; an interrupt (or any
    error) here stops the child, leaving the unit partial."""
    t0 = time.time()
    try:
        write_json(d / RUNNING_FILE, {"pid": proc.pid, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        next_beat = t0 + heartbeat_s
        while proc.poll() is None:
            time.sleep(0.2)
            if time.time() >= next_beat:
                next_beat += heartbeat_s
                row = last_eval(d)
                last = (f"last eval {float(row['mean_return']):.1f} at env step {row['env_step']}"
                        if row else "no eval yet")
                log(f"  {unit.key}: running {time.time() - t0:.0f} s, {last}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        CHILDREN.procs.remove(proc)


def _record_done(preset: Preset, unit: Unit, settings: Dict[str, Any], cmd: Sequence[str], returncode: int,
                 wall: float, d: Path, d_out: Path, keep_checkpoint: bool) -> None:
    """A finished unit: drop its checkpoint (unless kept), copy its small results to ``d_out`` and write
    ``unit.json`` there (status done, settings, command, wall time): the marker a rerun skips it by."""
    (d / RUNNING_FILE).unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(d / "checkpoint", ignore_errors=True)
    if d != d_out:
        d_out.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            shutil.copy2(d / name, d_out / name)
    write_json(d_out / UNIT_FILE, {"status": "done", "unit": dataclasses.asdict(unit), "preset": preset.name,
                                   "settings": settings, "command": list(cmd[:2]) + ["<boot>"] + list(cmd[3:]),
                                   "returncode": returncode, "wall_seconds": round(wall, 1),
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


@contextlib.contextmanager
def out_lock(out: Path):
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


def check_shared_path(out: Path, timeout_s: float = 300.0, probe: Optional[Callable[[str], Tuple[str, bool]]] = None
                      ) -> None:
    """Raise ``RuntimeError`` unless every alive Ray node sees ``out`` (a unit may run on any of them
    and writes its files there, so ``out`` must be on a shared filesystem). ``probe`` runs on each node
    (default: :func:`synther_buffer.distributed.check_shared_dir`'s)."""
    from synther_buffer.distributed import check_shared_dir

    try:
        check_shared_dir(out, timeout_s=timeout_s, probe=probe, why="units write their results there")
    except (ValueError, TimeoutError) as err:
        raise RuntimeError(f"--out: {err}") from err


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
                log(f"FAILED {units[i].key} on Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                if results[i] != "skipped":
                    log(f"{results[i]} {units[i].key} (Ray)")
            bar.update(1)
    return results
