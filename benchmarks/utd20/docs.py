"""The UTD=20 report's generated blocks in the project's docs (README.md, benchmarks/UTD20.md).

A doc holds a block between two marker lines,

    <!-- utd20:cpu begin -->
    ...
    <!-- utd20:cpu end -->

and ``python -m benchmarks.utd20 --preset cpu --report-only`` rewrites what lies between them from the
report's summary (``benchmarks.utd20.write_report``), so the tables a reader sees are built from the
committed unit files alone and never drift from them. Text outside the markers is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

Counts = Mapping[Tuple[str, str], int]   # (env, arm) -> seeds planned


def markers(name: str) -> Tuple[str, str]:
    """The begin and end lines of the block called ``name`` (e.g. ``"utd20:cpu"``)."""
    return f"<!-- {name} begin -->", f"<!-- {name} end -->"


def replace_block(text: str, name: str, body: str) -> Optional[str]:
    """``text`` with the lines between ``name``'s markers replaced by ``body``; ``None`` without the markers.

    Raises:
        ValueError: the markers are there but out of order, or more than once.
    """
    begin, end = markers(name)
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if not starts and not ends:
        return None
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"expected one {begin!r} line followed by one {end!r} line")
    return "\n".join(lines[:starts[0] + 1] + body.rstrip("\n").split("\n") + lines[ends[0]:])


def _cell(entry: Optional[Dict[str, Any]], planned: int) -> str:
    """``mean +- std (each seed's value)``; one seed: ``value (seed k)``; none finished: ``not yet`` / ``-``."""
    if entry is None:
        return "not yet" if planned else "-"
    if entry["n"] == 1:
        (seed, value), = entry["per_seed"].items()
        return f"{value:.1f} (seed {seed})"
    values = " / ".join(f"{v:.1f}" for v in entry["per_seed"].values())
    return f"{entry['mean']:.1f} +- {entry['std']:.1f} ({values})"


def render_block(summary: Dict[str, Any], planned: Counts, labels: Mapping[str, str],
                 published: Mapping[str, Mapping[str, int]], results_dir: Path, doc: Path, command: str) -> str:
    """The block's markdown: per-task final returns, the aggregate, the wall-clock split, the curves.

    Args:
        summary: ``write_report``'s summary of ``results_dir``.
        planned: seeds the preset plans per (env, arm); arms it does not plan but that finished (opt-in
            arms) get their own rows.
        labels: arm -> its human-readable name, in the report's order.
        published: task -> arm -> the paper's 100K-step return, shown for orientation.
        results_dir: where the units and plots live (image links are made relative to ``doc``).
        doc: the file the block goes into.
        command: the command that rebuilds the block.
    """
    finals = {(f["env"], f["arm"]): f for f in summary["final_returns"]}
    envs = sorted({e for e, _ in planned} | {e for e, _ in finals})
    arms = [a for a in labels if any((e, a) in planned or (e, a) in finals for e in envs)]
    done = len(summary["units"])
    total = sum(planned.values())
    extra = sum(1 for u in summary["units"] if (u["env"], u["arm"]) not in planned)
    count = (f"{done - extra} of the {total} planned units" + (f", plus {extra} of opt-in arms" if extra else "")
             if total else f"{done} units")
    def table(stat):
        return md_table(["arm"] + envs, [[labels[a]] + [_cell(stat(finals.get((e, a))), planned.get((e, a), 0))
                                                      for e in envs] for a in arms])

    lines = [f"*Generated from the unit files in `{_rel(results_dir, doc)}/` by `{command}`; edits between "
             "these markers are overwritten.*", "",
             f"Finished: {count}. Final eval return (the last evaluation, 5 episodes): mean +- std over the "
             "seeds finished (each seed's value); `not yet`: planned, not finished; `-`: not planned.", "",
             table(lambda f: f)]
    if any("late" in f for f in finals.values()):
        lines += ["", "A steadier statistic beside it: each run's mean over its last three evaluations (15 "
                  "episodes rather than 5), then mean +- std over seeds as above.", "",
                  table(lambda f: f and f.get("late"))]
    paper = [f"{e} " + ", ".join(f"{labels[a]} {v}" for a, v in published[e].items())
             for e in envs if e in published]
    if paper:
        lines += ["", "Published at 100K env steps (5 seeds; 10x this budget, other code and hardware: "
                  "orientation only): " + "; ".join(paper) + "."]
    if summary["aggregate"]:
        rows = [[labels.get(a, a), g["runs"], g["tasks"], f"{g['iqm']:.3f}",
                 f"[{g['iqm_ci'][0]:.3f}, {g['iqm_ci'][1]:.3f}]"] for a, g in summary["aggregate"].items()]
        lines += ["", "Across tasks (DMC-normalised final return = return / 1000; arms with units on every "
                  "task; 95% stratified-bootstrap CI):", "",
                  md_table(["arm", "runs per task", "tasks", "IQM", "IQM 95% CI"], rows)]
    if summary["probability_of_improvement"]:
        rows = [[f"{labels.get(p['x'], p['x'])} > {labels.get(p['y'], p['y'])}", ", ".join(p["envs"]),
                 f"{p['poi']:.2f}", f"[{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]"]
                for p in summary["probability_of_improvement"]]
        lines += ["", "Probability of improvement (final return, over run pairs per task):", "",
                  md_table(["P(X > Y)", "tasks", "estimate", "95% CI"], rows)]
    if summary["timing"]:
        rows = [[labels.get(t["arm"], t["arm"]), t["units"], f"{t['total']:,.0f}", f"{t['rl']:,.0f}",
                 f"{t['diffusion_fit']:,.0f}", f"{t['diffusion_sample']:,.0f}", f"{100 * t['diffusion_share']:.1f}%"]
                for t in summary["timing"]]
        lines += ["", "Wall clock per unit (seconds, mean over the arm's units; 1 torch thread on a shared "
                  "2-core machine):", "",
                  md_table(["arm", "units", "total", "RL", "diffusion training", "diffusion sampling",
                          "diffusion share"], rows)]
    if summary["pngs"]:
        lines += ["", " ".join(f"![{p}]({_rel(results_dir / p, doc)})" for p in summary["pngs"])]
    lines += ["", "With 1-3 seeds per arm only an effect several times the seed-to-seed spread is "
              "distinguishable; 10K env steps is the early, small-buffer regime, not the paper's 100K."]
    return "\n".join(lines)


def update_docs(docs: Sequence[Path], name: str, render) -> List[Path]:
    """Rewrites ``name``'s block in each of ``docs`` that has one; returns the files changed.

    Args:
        docs: candidate files (missing files and files without the markers are skipped).
        name: the block's name.
        render: ``doc -> body`` (image links depend on where the doc lives).
    """
    changed = []
    for doc in docs:
        if not doc.is_file():
            continue
        text = doc.read_text()
        new = replace_block(text, name, render(doc))
        if new is not None and new != text:
            doc.write_text(new)
            changed.append(doc)
    return changed


def _rel(path: Path, doc: Path) -> str:
    return Path(os.path.relpath(path.resolve(), doc.resolve().parent)).as_posix()


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
