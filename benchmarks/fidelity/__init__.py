"""Fidelity benchmark: is SynthER's synthetic data physically right? (simulator oracle)

Every synthetic transition ``(s, a, r, s')`` is replayed in the real simulator: the simulator is put
in state ``s`` (the observation maps back to the physics state), the action ``a`` (clipped to the
action bounds) is applied, and the simulator's next observation and reward are compared with the
synthetic ``s'`` and ``r``. Errors are divided per dimension by the real data's std, so 1.0 means
"as wrong as a random draw of the marginal". Beside it, distribution metrics against held-out real
data: per-dimension Wasserstein-1 distance (normalised by the real std, averaged over columns),
correlation-matrix error (mean |corr_real - corr_synth| over column pairs), nearest-neighbour
distance to the training rows (memorisation / diversity, cf. seed Figure 1a), and SDMetrics'
KSComplement / CorrelationSimilarity (seed Section 3.1) when ``sdmetrics`` is installed.

Environments whose observation is the full physics state (position without the x coordinate, and
velocity), so a transition can be replayed exactly:

* gymnasium MuJoCo ``HalfCheetah-v5`` (and ``-v4``): ``obs = concat(qpos[1:], qvel)`` (8 + 9);
  ``qpos[0]`` (the x position) is unobserved and set to 0 -- the dynamics are translation invariant
  and the reward uses only the x displacement during the step.
* DMC ``cheetah-run`` (``dm_control/cheetah-run-v0`` via shimmy): the flat observation is
  ``concat(position, velocity)`` = ``concat(qpos[1:], qvel)`` (gymnasium flattens the Dict in key
  order); verified by round trip (max error ~2e-6, float32 rounding).
* DMC ``walker-walk``: ``concat(height, orientations, velocity)``; body pitches ``atan2(xz, xx)``
  give the hinge angles, the torso height ``rootz``, ``velocity`` is ``qvel``, and the unobserved
  x position is replayed as 0 (the floor plane is infinite for collisions; the reward reads height,
  upright-ness and the centre-of-mass velocity).
* DMC ``reacher-hard``: ``concat(position, to_target, velocity)``; the target's position (a model
  parameter) is ``to_target`` plus the finger position from forward kinematics.

Both are verified by round trip on real transitions (``tests/test_oracle_dmc.py``).

Real data (``collect_transitions``) mixes three behaviour policies, chosen per episode (5 simulated
seconds each): uniform random actions; a random open-loop sinusoidal gait (random amplitude, phase,
bias and frequency per episode) plus N(0, 0.3) action noise; and a cheap "partially trained" policy:
an open-loop gait whose parameters were tuned by random search on return (``tune_gait``: 6 rounds of
16 noisy 5 s rollouts, 1-8 s of CPU), executed with N(0, 0.2) noise (for reacher: a noisy
closed-loop reaching controller, ``reach_action``, since random actions almost never touch its target). The tuned gait moves forward
(~1.25 reward/step on HalfCheetah-v5, ~0.13 on cheetah-run, where random actions give ~-0.35 and
~0.00), so the data covers still, flailing and running states. (No SAC is trained: too slow for a
benchmark on 2 shared cores.)

Baselines on the same table (all fitted / applied on the same training rows):

* ``real (held-out)`` -- fresh real transitions: the floor (dynamics error ~0).
* seed D.1 augmentations of the training rows: additive noise ``s, s' + N(0, 0.1)`` (std 0.1, raw
  units), multiplicative noise ``s, s' * eps``, one ``eps ~ U(0.8, 1.2)`` per transition, and
  dynamics noise ``s' = s + eps (s' - s)``, ``eps ~ U(0.5, 1.5)``.
* ``GMM``: a full-covariance Gaussian mixture on standardised rows (scikit-learn if installed,
  else a small numpy EM).
* ``TVAE`` / ``CTGAN`` (``ctgan`` package) with the seed's Table 6 / 7 defaults (the package
  defaults: TVAE 2x128 layers, embedding 128, batch 500, loss factor 2; CTGAN 2x256, embedding
  128, batch 500, 1 discriminator step), ``--ctgan-epochs`` epochs, each in a subprocess killed
  after ``--ctgan-budget-s`` seconds. Skipped with a reason when unavailable.
* ``SynthER``: ``TransitionDiffusion`` at ``--preset`` with the preset's sampler.

``--sampler-sweep`` re-samples the one trained SynthER model with several samplers (128/64/32-step
stochastic, 32/16-step deterministic) and reports dynamics error and samples/s for each.

CLI::

    python -m benchmarks.fidelity --env HalfCheetah-v5 --preset fast --num-real 10000 \
        --num-synthetic 10000 --out results/fidelity [--sampler-sweep]

writes ``fidelity.json``, ``fidelity.csv`` (main table), ``fidelity_sweep.csv`` (with
``--sampler-sweep``) and ``marginals.png`` (seed Figure 8 style: SynthER vs real) into ``--out``
and prints the tables as markdown.

Layout: :mod:`.oracles` (the simulator side: the scorer, re-exported from
:mod:`synther_buffer.oracle` where ``synther report --env-id`` uses it, and the behaviour policies
that collect real data), :mod:`.baselines` (augmentations, GMM, TVAE/CTGAN), :mod:`.metrics`
(distribution metrics, SDMetrics, the marginals plot), :mod:`.cli` (the run and its tables), :mod:`.sizes`
(fidelity as the real data grows: ``python -m benchmarks.fidelity.sizes``).
Every public name is importable from ``benchmarks.fidelity`` itself.
"""

from .baselines import _gmm_numpy, augment, ctgan_generate, gmm_generate  # noqa: F401 (_gmm_numpy: tests)
from .cli import (ALL_GENERATORS, GENERATOR_LABELS, SWEEP_COLUMNS, SWEEP_SETTINGS, TABLE_COLUMNS,
                  build_parser, format_result, main, markdown_table, run, sweep_label)
from .metrics import distribution_metrics, plot_marginals, sdmetrics_scores
from .oracles import (KEYS, POLICIES, REACH_NOISE, SUPPORTED_ENVS, TUNED_NOISE, DMCCheetahOracle, DMCOracle,
                      DMCReacherOracle, DMCWalkerOracle, GaitParams, HalfCheetahOracle, SimulatorOracle,
                      collect_transitions, make_oracle, reach_action, safe_std, score_transitions, tune_gait)

__all__ = ["ALL_GENERATORS", "GENERATOR_LABELS", "SWEEP_COLUMNS", "SWEEP_SETTINGS", "TABLE_COLUMNS", "build_parser",
           "format_result", "main", "markdown_table", "run", "sweep_label", "augment", "ctgan_generate",
           "gmm_generate", "distribution_metrics", "plot_marginals", "sdmetrics_scores", "KEYS", "POLICIES",
           "SUPPORTED_ENVS", "REACH_NOISE", "TUNED_NOISE", "DMCCheetahOracle", "DMCOracle", "DMCReacherOracle",
           "DMCWalkerOracle", "GaitParams", "HalfCheetahOracle", "SimulatorOracle", "collect_transitions",
           "make_oracle", "reach_action", "safe_std", "score_transitions", "tune_gait"]
