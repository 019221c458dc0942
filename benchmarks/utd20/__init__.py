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

from .cli import DOCS, build_parser, main
from .report import LATE_EVALS, PAPER_100K, collect, late_return, split_stale, write_report
from .runner import check_shared_path, ray_connect, run_unit, run_units_on_ray, score_pool
from .stats import (GYM_REFERENCE, aggregate_scores, iqm, normaliser, probability_of_improvement,
                    probability_of_improvement_ci, stratified_bootstrap_ci)
from .units import (ARMS, PAPER_ARMS, PAPER_ENVS, POOL_FIDELITY_FILE, POOL_FILE, PRESETS, REPO, RESULT_FILES,
                    RUNNING_FILE, UNIT_FILE, Arm, Preset, Unit, env_dirname, plan, resume_first, settings_match,
                    unit_args, unit_settings, unit_status)

__all__ = ["ARMS", "Arm", "DOCS", "GYM_REFERENCE", "LATE_EVALS", "PAPER_100K", "PAPER_ARMS", "PAPER_ENVS",
           "POOL_FIDELITY_FILE", "POOL_FILE", "PRESETS", "Preset", "REPO", "RESULT_FILES", "RUNNING_FILE",
           "UNIT_FILE", "Unit", "aggregate_scores", "build_parser", "check_shared_path", "collect", "env_dirname",
           "iqm", "late_return", "main", "normaliser", "plan", "probability_of_improvement",
           "probability_of_improvement_ci", "ray_connect", "resume_first", "run_unit", "run_units_on_ray",
           "score_pool", "settings_match", "split_stale", "stratified_bootstrap_ci", "unit_args", "unit_settings", "unit_status",
           "write_report"]
