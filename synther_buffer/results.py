"""Small, RL-framework-free helpers shared by ``synther train`` and the integration scripts.

Everything here works with any agent and any replay buffer; only numpy, matplotlib (Agg, optional:
the ``offline`` extra; without it the learning curve is skipped with one warning), gymnasium-style
environments and tqdm are used.

* :func:`evaluate` -- run ``episodes`` evaluation episodes of ``policy_fn`` and return their returns.
* :class:`TimingSplit` -- where the wall time went (setup, RL, diffusion training, sampling, eval).
* :class:`RetrainTracker` -- polls a SynthER buffer's ``stats()`` and records every retrain
  (env step, loss, fit and generate seconds), summing them into a ``TimingSplit``.
* :class:`Results` -- appends evaluation rows to ``eval_returns.csv`` and ``results.json`` and
  redraws ``learning_curve.png`` under an output directory.
* :class:`TrainingMonitor` -- the per-env-step hook a training loop calls: a tqdm bar over env steps
  (steps/s, retrains, last eval), the periodic evaluation, the retrain tracking, and at the end the
  final evaluation, the JSON summary and :func:`format_summary`'s table.

A training loop (SB3 callback or hand-written) needs three calls::

    timing = TimingSplit()                      # starts the clock
    ...build env, agent, buffer...
    timing.mark("setup")
    monitor = TrainingMonitor(Results(out_dir, config=vars(args)), total_steps, eval_every,
                              eval_episodes, eval_env, policy_fn, stats_fn=buf.stats, timing=timing)
    for step in ...: ...; monitor.step(env_steps)   # after each env step (and buffer add)
    summary = monitor.finish()                      # final eval, JSON, PNG
    print(format_summary(summary))
"""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .extras import MissingExtraError, require
from .validation import non_negative_int, positive_int

CSV_NAME = "eval_returns.csv"
JSON_NAME = "results.json"
PNG_NAME = "learning_curve.png"
CSV_FIELDS = ("env_step", "mean_return", "std_return", "min_return", "max_return", "episodes",
              "retrains", "wall_seconds")

# Display names and order of the timing sections (anything else is shown after these).
SECTION_LABELS = {
    "setup": "setup (env, agent, buffer)",
    "rl": "RL (env steps + agent updates)",
    "diffusion_fit": "diffusion training",
    "diffusion_sample": "diffusion sampling",
    "eval": "evaluation",
}


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(policy_fn: Callable[[np.ndarray], Any], env, episodes: int) -> List[float]:
    """Run ``episodes`` full episodes of ``policy_fn(obs) -> action`` on ``env``; return their returns.

    ``env`` is a gymnasium-style single env (``reset() -> (obs, info)``, ``step(a) -> (obs, r,
    terminated, truncated, info)``) with a time limit. The env is reset before each episode without
    a seed, so successive calls see fresh initial states from the env's own RNG (seed it once at
    creation, e.g. ``make_env(env_id, seed=...)``).
    """
    positive_int("episodes", episodes)
    returns = []
    for _ in range(int(episodes)):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy_fn(obs))
            total += float(reward)
            done = bool(terminated) or bool(truncated)
        returns.append(total)
    return returns


# ---------------------------------------------------------------------------------------- timing
class TimingSplit:
    """Accumulates wall time per named section; whatever is not attributed is the RL loop's.

    ``add(name, s)`` / ``with section(name):`` attribute time to a section. ``mark(name)`` gives
    ``name`` all the time since the previous mark (or the start) that no section claimed, e.g.
    ``mark("setup")`` after building the env and agent. ``as_dict()`` gives the remainder since the
    last mark to ``"rl"``. Sections listed in ``concurrent`` (a background diffusion retrain, say)
    are reported but not subtracted from the remainder, since they overlapped it.
    """

    def __init__(self, concurrent: Sequence[str] = ()):
        self.start = time.perf_counter()
        self.sections: Dict[str, float] = {}
        self.concurrent = set(concurrent)
        self._last_mark = self.start
        self._claimed_since_mark = 0.0

    def add(self, name: str, seconds: float) -> None:
        """Attribute ``seconds`` to section ``name``."""
        self.sections[name] = self.sections.get(name, 0.0) + float(seconds)
        if name not in self.concurrent:
            self._claimed_since_mark += float(seconds)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the ``with`` block into section ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def mark(self, name: str) -> float:
        """Attribute the unclaimed time since the last mark to ``name``; return those seconds."""
        now = time.perf_counter()
        seconds = max(0.0, now - self._last_mark - self._claimed_since_mark)
        self.sections[name] = self.sections.get(name, 0.0) + seconds
        self._last_mark, self._claimed_since_mark = now, 0.0
        return seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def state_dict(self) -> Dict[str, float]:
        """The split so far (``as_dict()``), for a checkpoint."""
        return self.as_dict()

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Add a checkpointed split (``state_dict()`` of the run being resumed) to this one.

        Its sections are added to this process's, and its total counts as already elapsed, so the
        final split covers the work kept from before the resume plus everything since.
        """
        state = dict(state)
        self.start -= float(state.pop("total", 0.0))
        for name, seconds in state.items():
            self.sections[name] = self.sections.get(name, 0.0) + float(seconds)

    def as_dict(self, remainder: str = "rl") -> Dict[str, float]:
        """``{"total": ..., section: seconds, ..., remainder: unclaimed time since the last mark}``."""
        now = time.perf_counter()
        out = dict(self.sections)
        out[remainder] = out.get(remainder, 0.0) + max(0.0, now - self._last_mark - self._claimed_since_mark)
        out["total"] = now - self.start
        return out


# ---------------------------------------------------------------------------------------- retrains
class RetrainTracker:
    """Records SynthER retrains by polling ``stats_fn()`` (a buffer's ``stats``) after env steps.

    Works with ``GenerativeReplay``, ``WrappedReplay`` and the SB3 ``GenerativeReplayBuffer``: it reads
    ``retrain_count``, ``failed_retrains``, ``last_fit_seconds``, ``last_generate_seconds``,
    ``last_train_loss``, ``env_steps``, ``last_retrain_env_step``, ``num_synthetic``, ``num_real``,
    ``last_fit_warm`` and ``last_warm_skipped`` (when present). Poll at least once per env step (one add
    triggers at most one retrain) so every retrain's seconds are seen.

    Each event's ``env_step`` is where the new pool was first seen (for ``async_retrain``, the swap),
    ``data_env_step`` the env step whose data the model was trained on (equal without ``async_retrain``).
    """

    def __init__(self, stats_fn: Optional[Callable[[], dict]], timing: Optional[TimingSplit] = None):
        self.stats_fn = stats_fn
        self.timing = timing
        self.events: List[Dict[str, Any]] = []
        self.count = 0
        self.failed = 0
        self.fit_seconds = 0.0
        self.generate_seconds = 0.0

    def poll(self) -> bool:
        """Check for new retrains; True if one (or more) happened since the last poll."""
        if self.stats_fn is None:
            return False
        s = self.stats_fn()
        self.failed = int(s.get("failed_retrains", 0))
        count = int(s.get("retrain_count", 0))
        if count <= self.count:
            return False
        fit, gen = float(s.get("last_fit_seconds", 0.0)), float(s.get("last_generate_seconds", 0.0))
        # Normally exactly one new retrain; if polls were missed only the last one's seconds are known.
        self.events.append({"retrain": count, "env_step": int(s.get("env_steps", -1)),
                            "data_env_step": int(s.get("last_retrain_env_step", s.get("env_steps", -1))),
                            "loss": _finite_or_none(s.get("last_train_loss")),
                            "fit_seconds": fit, "generate_seconds": gen,
                            "num_real": s.get("num_real"), "num_synthetic": s.get("num_synthetic"),
                            "missed": count - self.count - 1, "warm": bool(s.get("last_fit_warm", False))})
        if s.get("last_warm_skipped"):   # asked to be warm, fitted from scratch: why
            self.events[-1]["warm_skipped"] = s["last_warm_skipped"]
        self.count = count
        self.fit_seconds += fit
        self.generate_seconds += gen
        if self.timing is not None:
            self.timing.add("diffusion_fit", fit)
            self.timing.add("diffusion_sample", gen)
        return True

    def state_dict(self) -> Dict[str, Any]:
        """The recorded retrains and counters (JSON-able), for a checkpoint."""
        return {"events": self.events, "count": self.count, "failed": self.failed,
                "fit_seconds": self.fit_seconds, "generate_seconds": self.generate_seconds}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the counters (the seconds are already in the checkpointed ``TimingSplit``)."""
        self.events = list(state["events"])
        self.count, self.failed = int(state["count"]), int(state["failed"])
        self.fit_seconds, self.generate_seconds = float(state["fit_seconds"]), float(state["generate_seconds"])


# ---------------------------------------------------------------------------------------- results
class Results:
    """Evaluation results under ``out_dir``: ``eval_returns.csv``, ``results.json``, ``learning_curve.png``.

    Args:
        out_dir: created if missing; existing result files in it are overwritten.
        config: anything JSON-able describing the run (CLI args, SynthER config); stored in the JSON.
        title: the plot title.
        plot: redraw the PNG after each ``add`` (it is always drawn by ``write``).

    ``add(env_step, returns)`` appends a CSV row and rewrites the JSON; ``write(summary)`` stores the
    final summary (timing split, retrains) in the JSON and draws the learning curve.
    """

    def __init__(self, out_dir, config: Optional[dict] = None, title: str = "", plot: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / CSV_NAME
        self.json_path = self.out_dir / JSON_NAME
        self.png_path = self.out_dir / PNG_NAME
        self.config = _jsonable(config or {})
        self.title = title
        self.plot_each_eval = plot
        self.rows: List[Dict[str, Any]] = []
        self.retrain_steps: List[int] = []
        self.summary: Dict[str, Any] = {}
        self.plot_skipped: Optional[str] = None  # why the PNG is not drawn (matplotlib missing), if so
        with open(self.csv_path, "w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)
        self._write_json()

    def add(self, env_step: int, returns: Sequence[float], retrains: int = 0,
            wall_seconds: float = float("nan"), agent: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        """Record one evaluation (the episode returns at ``env_step``); returns the row.

        ``agent``: the learner's state at this point (e.g. its entropy temperature), kept in the JSON row
        under ``"agent"`` (the CSV's columns stay fixed).
        """
        r = np.asarray(returns, dtype=np.float64)
        row = {"env_step": int(env_step), "mean_return": float(r.mean()), "std_return": float(r.std()),
               "min_return": float(r.min()), "max_return": float(r.max()), "episodes": int(r.size),
               "retrains": int(retrains), "wall_seconds": round(float(wall_seconds), 3),
               "returns": [float(x) for x in r]}
        if agent:
            row["agent"] = {k: float(v) for k, v in agent.items()}
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in CSV_FIELDS])
        self._write_json()
        if self.plot_each_eval:
            self.plot()
        return row

    def restore(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Replace the recorded evaluations with ``rows`` (from a checkpoint) and rewrite the files."""
        self.rows = [dict(r) for r in rows]
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_FIELDS)
            w.writerows([r[k] for k in CSV_FIELDS] for r in self.rows)
        os.replace(tmp, self.csv_path)
        self._write_json()
        if self.plot_each_eval:
            self.plot()

    def write(self, summary: Dict[str, Any]) -> None:
        """Store the final ``summary`` in the JSON and draw the learning curve.

        If the curve cannot be drawn (no matplotlib), ``summary["files"]["png"]`` (when present) is set
        to None and ``summary["files"]["png_note"]`` says why, in the JSON and in the caller's dict.
        """
        self.summary = _jsonable(summary)
        self.retrain_steps = [e["env_step"] for e in summary.get("retrains", [])]
        self._write_json()
        self.plot()
        if self.plot_skipped is not None and isinstance(summary.get("files"), dict):
            summary["files"].update(png=None, png_note=self.plot_skipped)
            self.summary = _jsonable(summary)
            self._write_json()

    def _write_json(self) -> None:
        data = _jsonable({"config": self.config, "evals": self.rows, **self.summary})
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
        os.replace(tmp, self.json_path)

    def plot(self) -> Optional[Path]:
        """Draw mean +- std of the eval returns against env steps (retrains as dotted lines).

        Returns:
            The PNG's path; None if there is no evaluation yet, or if matplotlib (the ``offline``
            extra) is missing: a training run should not die for its plot, so the curve is then
            skipped with one ``RuntimeWarning`` (the CSV and JSON hold the same numbers) and
            ``plot_skipped`` says why.
        """
        if not self.rows:
            return None
        try:
            matplotlib = require("matplotlib", "offline", "the learning-curve plot")
        except MissingExtraError as e:
            if self.plot_skipped is None:
                self.plot_skipped = str(e)
                warnings.warn(f"{e}; {self.png_path.name} skipped, the CSV and JSON hold the numbers",
                              RuntimeWarning, stacklevel=2)
            return None
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        x = np.array([r["env_step"] for r in self.rows])
        m = np.array([r["mean_return"] for r in self.rows])
        s = np.array([r["std_return"] for r in self.rows])
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(x, m, marker="o", ms=3, label="eval return (mean)")
        ax.fill_between(x, m - s, m + s, alpha=0.25, label="+- std")
        for i, step in enumerate(self.retrain_steps):
            ax.axvline(step, color="grey", ls=":", lw=1, label="SynthER retrain" if i == 0 else None)
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return")
        ax.set_title(textwrap.fill(self.title, 80), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        tmp = self.png_path.with_name(self.png_path.stem + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png_path)
        return self.png_path


# ---------------------------------------------------------------------------------------- the loop hook
class TrainingMonitor:
    """Per-env-step hook: progress bar, periodic evaluation, retrain tracking, final summary.

    Args:
        results: where evaluations go.
        total_steps: env steps of the run (the bar's length).
        eval_every: evaluate every this many env steps (0 = only at the end), and always at the end.
        eval_episodes: episodes per evaluation.
        eval_env: a separate env for evaluation.
        policy_fn: ``policy_fn(obs) -> action``, deterministic (called only during evaluation).
        stats_fn: the SynthER buffer's ``stats`` (``None`` for a plain buffer: no retrain tracking).
        agent_stats_fn: ``() -> {name: float}``, the learner's state recorded with each evaluation (e.g.
            SAC's entropy temperature); it must not draw random numbers (that would change the run).
        timing: a running ``TimingSplit`` (a new one is started if ``None``).
        progress: show the tqdm bar.
        eval_at_start: also evaluate at env step 0 (the untrained policy).
    """

    def __init__(self, results: Results, total_steps: int, eval_every: int, eval_episodes: int, eval_env,
                 policy_fn: Callable[[np.ndarray], Any], stats_fn: Optional[Callable[[], dict]] = None,
                 timing: Optional[TimingSplit] = None, progress: bool = True, eval_at_start: bool = True,
                 agent_stats_fn: Optional[Callable[[], Dict[str, float]]] = None):
        non_negative_int("eval_every", eval_every)
        self.results, self.total_steps = results, int(total_steps)
        self.eval_every, self.eval_episodes = int(eval_every), int(eval_episodes)
        self.eval_env, self.policy_fn, self.agent_stats_fn = eval_env, policy_fn, agent_stats_fn
        self.timing = timing if timing is not None else TimingSplit()
        self.retrains = RetrainTracker(stats_fn, self.timing)
        self.env_steps = 0
        self.last_eval_step: Optional[int] = None
        self.next_eval = self.eval_every if self.eval_every else math.inf
        self.last_eval: Optional[Dict[str, Any]] = None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total_steps, desc="env steps", unit="step", dynamic_ncols=True,
                            smoothing=0.05)
        if eval_at_start:
            self.evaluate(0)

    def step(self, env_steps: int) -> None:
        """Call once per env step with the env-step count; an evaluation that falls due runs here.

        Where in the step it is called is the caller's choice: the custom loop calls it after the
        transition is stored and the step's updates ran; SB3's callback (``_on_step``) before SB3 stores
        the transition and updates, so an SB3 evaluation sees one env step's updates fewer.
        """
        new_retrain = self.retrains.poll()
        if self.bar is not None:
            self.bar.update(env_steps - self.env_steps)
        self.env_steps = env_steps
        if env_steps >= self.next_eval:
            while self.next_eval <= env_steps:
                self.next_eval += self.eval_every
            self.evaluate(env_steps)
        elif new_retrain:
            self._postfix()

    def evaluate(self, env_steps: int) -> Dict[str, Any]:
        """Evaluate now and record the row."""
        with self.timing.section("eval"):
            returns = evaluate(self.policy_fn, self.eval_env, self.eval_episodes)
        self.last_eval_step = env_steps
        agent = self.agent_stats_fn() if self.agent_stats_fn is not None else None
        self.last_eval = self.results.add(env_steps, returns, retrains=self.retrains.count,
                                          wall_seconds=self.timing.elapsed(), agent=agent)
        self._postfix()
        return self.last_eval

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue this monitor (JSON-able): env steps, the eval
        schedule, the recorded evaluations, the retrain events and the timing split."""
        self.retrains.poll()  # a retrain that just finished belongs to the time before the checkpoint
        return {"env_steps": self.env_steps, "last_eval_step": self.last_eval_step,
                "next_eval": None if math.isinf(self.next_eval) else self.next_eval,
                "last_eval": self.last_eval, "rows": self.results.rows,
                "retrains": self.retrains.state_dict(), "timing": self.timing.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a checkpoint: evaluations after it are discarded from the
        result files (they will be redone), the bar starts at the checkpoint's env step.

        Build the monitor with ``eval_at_start=False`` when resuming, then call this.
        """
        self.env_steps = int(state["env_steps"])
        self.last_eval_step = state["last_eval_step"]
        self.next_eval = math.inf if state["next_eval"] is None else int(state["next_eval"])
        self.last_eval = state["last_eval"]
        self.retrains.load_state_dict(state["retrains"])
        self.timing.load_state_dict(state["timing"])
        self.results.restore(state["rows"])
        if self.bar is not None:
            self.bar.reset(total=self.total_steps)
            self.bar.update(self.env_steps)
        self._postfix()

    def _postfix(self) -> None:
        if self.bar is None:
            return
        post = {"retrains": self.retrains.count}
        if self.last_eval is not None:
            post["eval"] = f"{self.last_eval['mean_return']:.1f}@{self.last_eval['env_step']}"
        self.bar.set_postfix(post, refresh=True)

    def finish(self, extra: Optional[Dict[str, Any]] = None, final_stats: Optional[dict] = None) -> Dict[str, Any]:
        """Final poll and evaluation (if the last step was not evaluated), JSON summary and plot.

        ``extra`` is merged into the summary; ``final_stats`` (the buffer's last ``stats()``) is stored too.
        Returns the summary (see :func:`format_summary`).
        """
        self.retrains.poll()
        if self.last_eval_step != self.env_steps or self.last_eval is None:
            self.evaluate(self.env_steps)
        if self.bar is not None:
            self.bar.close()
        timing = self.timing.as_dict()
        summary = {
            "env_steps": self.env_steps,
            "final_eval": {k: self.last_eval[k] for k in ("env_step", "mean_return", "std_return", "episodes")},
            "retrain_count": self.retrains.count,
            "failed_retrains": self.retrains.failed,
            "retrains": self.retrains.events,
            "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
            "concurrent_sections": sorted(self.timing.concurrent),
            "files": {"csv": str(self.results.csv_path), "json": str(self.results.json_path),
                      "png": str(self.results.png_path)},
        }
        if final_stats is not None:
            summary["buffer_stats"] = final_stats
        summary.update(extra or {})
        self.results.write(summary)
        return summary


def format_summary(summary: Dict[str, Any], title: str = "") -> str:
    """The final table: eval return, retrains, where the time went, and the result files."""
    fe = summary["final_eval"]
    lines = [title] if title else []
    lines.append(f"  {'final eval return':<34}{fe['mean_return']:>10.1f} +- {fe['std_return']:.1f} "
                 f"({fe['episodes']} episode{'s' if fe['episodes'] != 1 else ''} at env step {fe['env_step']:,})")
    steps = ", ".join(f"{e['env_step']:,}" for e in summary.get("retrains", []))
    failed = f", {summary['failed_retrains']} failed" if summary.get("failed_retrains") else ""
    lines.append(f"  {'SynthER retrains':<34}{summary['retrain_count']:>10d}"
                 + (f" (at env steps {steps}{failed})" if steps or failed else ""))
    t = dict(summary["timing_seconds"])
    total = t.pop("total")
    concurrent = set(summary.get("concurrent_sections", ()))
    lines.append(f"  {'wall time':<34}{total:>10.1f} s")
    order = [k for k in SECTION_LABELS if k in t] + sorted(k for k in t if k not in SECTION_LABELS)
    for k in order:
        label = SECTION_LABELS.get(k, k) + (" (background)" if k in concurrent else "")
        pct = 100.0 * t[k] / total if total > 0 else 0.0
        lines.append(f"    {label:<32}{t[k]:>10.1f} s  {pct:5.1f}%")
    files = summary.get("files", {})
    if files:
        lines.append(f"  {'results':<34}{files['csv']}, {files['json']}")
        lines.append(f"  {'plot':<34}{files['png'] or 'not drawn: ' + str(files.get('png_note'))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- helpers
def _finite_or_none(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _jsonable(obj):
    """A JSON-safe copy: dicts/lists recursed, numpy scalars unwrapped, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)
