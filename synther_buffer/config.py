"""SynthERConfig: every hyperparameter of the diffusion engine and the online schedule, plus presets.

Sources (see ../shared/seed/synther-supplementary.txt):
  * Table 8  -- residual MLP denoiser: width 1024, depth 6, RFF dim 16, ReLU, Adam 3e-4 cosine,
                100K steps, batch 256 (online / < 1M rows) else 1024.
  * Table 9  -- EDM stochastic sampler: 128 steps, sigma_min 0.002, sigma_max 80, S_churn 80,
                S_tmin 0.05, S_tmax 50, S_noise 1.003.
  * D.2      -- online: retrain every 10K env steps, generate 1M transitions.
  * E.2 / reference code -- 50/50 real/synthetic batches.
  * EDM (Karras et al. 2022) -- sigma_data 1 (our data is standardised), rho 7, P_mean -1.2, P_std 1.2.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

from .validation import check_bool, check_choice, check_int, finite_float, positive_float, positive_int

_log = logging.getLogger(__name__)
_ANNOUNCED: set = set()   # presets for_device has logged (once per process each)

SAMPLERS = ("stochastic", "deterministic")
PRECISIONS = ("fp32", "bf16")
GRADIENTS = ("auto", "manual", "autograd")
PARAM_LAYOUTS = ("auto", "flat", "per_tensor")
RETRAIN_BACKENDS = ("thread", "ray")
RELEVANCES = (None, "curiosity", "reward")   # Prioritized Generative Replay (synther_buffer/relevance.py)


@dataclass(frozen=True)
class SynthERConfig:
    """Hyperparameters of SynthER. Build with ``SynthERConfig.preset(name)`` and tweak with ``replace``.

    Every field is validated on construction (``ValueError`` naming the field); numpy scalars are
    stored as plain Python numbers, so ``to_dict`` stays JSON- and ``weights_only``-safe.

    Attributes:
        width: hidden width of the residual MLP denoiser (seed B.2, Table 8).
        depth: number of residual blocks ``x + linear(relu(norm(x)))``.
        rff_dim: random Fourier feature dimension of the noise-level embedding.
        time_dim: width of the noise embedding / input projection (reference code: 128).
        train_steps: gradient steps per fit (each retrain trains from scratch, unless ``warm_start``);
            with ``train_steps_rows`` set, the steps of a fit on up to that many rows.
        train_steps_rows: the data-size budget rule: ``None`` (the paper's) trains ``train_steps``
            whatever the data size; a row count ``n0`` makes a fit on ``n > n0`` rows train
            ``train_steps * (n / n0) ** train_steps_power`` steps (``train_steps_for``), so a growing
            online buffer is not seen fewer times per row as it grows (benchmarks/FIDELITY.md,
            "Fidelity as the data grows").
        train_steps_power: exponent of that growth: 1 keeps the epochs per fit constant, 0 is the
            fixed budget.
        max_train_steps: cap of the rule's steps (``None``: no cap).
        batch_size: training batch; ``None`` picks 256 below 1M rows, else 1024 (Table 8).
        lr: Adam learning rate, cosine-annealed to 0 over the fit's steps.
        ema_decay: largest decay of the EMA of the weights that sampling uses (``ema.EMA``: it copies
            the weights for a warm-up, then its decay grows towards this value).
        ema_every: the EMA is updated every ``ema_every`` training steps, and after a fit's last.
        grad_clip: max global gradient norm (reference code: 1.0).
        compile: run the training step's loss and gradients through ``torch.compile``. Opt-in: the
            first fit of a process pays a one-off compilation (later fits of the same shapes reuse it);
            it pays off most for small networks on CPU, where per-op overhead dominates
            (benchmarks/THROUGHPUT.md). Needs a C++ compiler on CPU; if compilation fails the fit
            warns and trains eagerly.
        precision: ``"fp32"`` (default: the paper's, reproducible) or ``"bf16"``: the denoiser's
            matmuls in bfloat16 for training and sampling, as ``torch.autocast`` does (fp32 weights,
            Adam state, LayerNorm, loss and sampler arithmetic). For CUDA GPUs with bf16 support and
            CPUs with AVX512-BF16 / AMX (elsewhere it works but is slower than fp32). Measured cost
            and speed: benchmarks/THROUGHPUT.md, benchmarks/FIDELITY.md.
        gradients: how a training step computes its gradients. ``"auto"`` (default) and ``"manual"``:
            by hand (``synther_buffer/manual_grad.py``: the same maths as autograd, less per-op
            overhead) when the denoiser has exactly the structure those formulas assume, else by
            autograd with one warning; ``"autograd"``: always by autograd.
        param_layout: ``"flat"``: all parameters (and gradients) as views of one buffer, so clipping,
            Adam and the EMA each run as one op; ``"per_tensor"``: one tensor per layer; ``"auto"``
            (default): flat with hand-written gradients, on CUDA, and for networks up to
            ``train_step.FLAT_MAX_PARAMS_CPU`` parameters on CPU, per tensor otherwise. The same
            model either way (float sums aside).
        warm_start: retrain by continuing from the previous model instead of from scratch. ``False``
            (default) is the paper's schedule (seed D.2: every retrain trains a fresh network). ``True``:
            a retrain whose pool already holds a successfully trained model of the same layout starts
            from its weights and EMA, with a fresh Adam state and a new cosine schedule over
            ``warm_start_steps``, keeping the normaliser of the last full fit (the first retrain, any
            retrain without such a model, and one whose data has moved far from that normaliser is a
            full fit; ``TransitionDiffusion.fit``). Measured: benchmarks/WARM_START.md.
        warm_start_steps: gradient steps of a warm retrain; ``None`` (default): a quarter of the cold
            fit's steps for the same rows (``warm_steps``).
        sigma_min: smallest noise level of the sampler (EDM, Karras et al. 2022, eq. 5).
        sigma_max: largest noise level of the sampler.
        sigma_data: the data's standard deviation in the preconditioning (1: rows are standardised).
        rho: curvature of the noise schedule (eq. 5).
        p_mean: mean of the log-normal training noise distribution.
        p_std: standard deviation of the log-normal training noise distribution.
        sample_steps: number of noise levels N of the sampler (Table 9).
        sampler: ``"stochastic"`` (Algorithm 2 with churn) or ``"deterministic"`` (Heun, Algorithm 1).
        s_churn: amount of stochasticity of Algorithm 2 (>= 0).
        s_tmin: lowest noise level that gets churn.
        s_tmax: highest noise level that gets churn.
        s_noise: scale of the churn noise.
        sample_batch_size: rows denoised at once (memory bound), ``None`` = 100K on CUDA, 16K on CPU.
        retrain_every: env steps (transitions added, n_envs per vector step) between retrains (seed D.2).
        synthetic_size: capacity of the synthetic pool.
        num_generate: rows generated per retrain (clipped to ``synthetic_size``).
        real_ratio: fraction of each sampled batch drawn from real data.
        min_real: no retrain before this many real transitions are stored.
        normalize_reward: standardise the reward column (the official DMC config does not).
        outlier_std: synthetic rows farther than this many real stds from the real mean on any
            dimension are dropped (and counted); ``None`` keeps everything.
        async_retrain: retrain in a background thread while the agent keeps stepping and training on
            the previous pool; the new pool is swapped in atomically when ready. ``False`` (default)
            is the paper's synchronous schedule (reproducible).
        retrain_backend: where a retrain's fit + generate + filter runs. ``"thread"`` (default): in
            this process (in a background thread when ``async_retrain``). ``"ray"``: in a Ray actor
            placed by resources (another GPU or node; ``synther_buffer.distributed``; the
            ``distributed`` extra); ``async_retrain`` still decides whether the agent waits for it.
        relevance: Prioritized Generative Replay (PGR; Wang et al., ICLR 2025): condition the diffusion
            model on a relevance score of each real row and generate at high relevance with
            classifier-free guidance (``synther_buffer/relevance.py``, ``synther_buffer/guidance.py``).
            ``None`` (default): plain SynthER. ``"curiosity"``: the prediction error of an ICM-style
            forward model in a learned feature space, the model trained on the real rows at each
            retrain (continuing from the previous retrain's weights); ``"reward"``: the reward. A
            buffer's ``set_relevance_fn(fn)`` supplies any other score (a TD error, say).
        guidance_scale: classifier-free guidance weight w in D = D_uncond + w (D_cond - D_uncond)
            (PGR: 2.0); 0 samples the unconditional model, 1 the conditional one.
        cond_dropout: probability that a training row's condition is dropped (replaced by the null
            condition), which trains the unconditional branch guidance needs (PGR: 0.25).
        relevance_top_frac: conditioning values at sampling time are drawn uniformly from the scores
            of this top fraction of the real rows (PGR's DMC config: 0.25).
        relevance_train_steps: Adam steps of the curiosity model per retrain; ``None`` (default) =
            ``retrain_every``: PGR's rate of one step per env step.
        relevance_hidden: hidden width (and feature width) of the curiosity networks (PGR: 256).
        device: ``"auto"`` (CUDA when available, else CPU), or any torch device string.
        seed: seeds weight init, training batches and sampling noise.
        progress: show tqdm progress bars for fit and sample.
    """

    # denoiser
    width: int = 1024
    depth: int = 6
    rff_dim: int = 16
    time_dim: int = 128
    # training
    train_steps: int = 100_000
    train_steps_rows: Optional[int] = None
    train_steps_power: float = 1.0
    max_train_steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: float = 3e-4
    ema_decay: float = 0.995
    ema_every: int = 10
    grad_clip: float = 1.0
    compile: bool = False
    precision: str = "fp32"
    gradients: str = "auto"
    param_layout: str = "auto"
    warm_start: bool = False
    warm_start_steps: Optional[int] = None
    # EDM
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 1.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    # sampler
    sample_steps: int = 128
    sampler: str = "stochastic"
    s_churn: float = 80.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    sample_batch_size: Optional[int] = None
    # online schedule
    retrain_every: int = 10_000
    synthetic_size: int = 1_000_000
    num_generate: int = 1_000_000
    real_ratio: float = 0.5
    min_real: int = 1_000
    normalize_reward: bool = True
    outlier_std: Optional[float] = 10.0
    async_retrain: bool = False
    retrain_backend: str = "thread"
    # relevance-guided generation (PGR)
    relevance: Optional[str] = None
    guidance_scale: float = 2.0
    cond_dropout: float = 0.25
    relevance_top_frac: float = 0.25
    relevance_train_steps: Optional[int] = None
    relevance_hidden: int = 256
    # misc
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value in self._checked().items():   # numpy scalars stored as plain int / float
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the first invalid field.
        """
        self._checked()

    def _checked(self) -> dict:
        """Validate every field; return the numeric ones as plain Python ints / floats."""
        out = {}
        for name in ("width", "depth", "rff_dim", "time_dim", "train_steps", "ema_every", "sample_steps",
                     "retrain_every", "synthetic_size", "num_generate", "min_real"):
            out[name] = positive_int(f"SynthERConfig.{name}", getattr(self, name))
        for name in ("batch_size", "sample_batch_size", "train_steps_rows", "max_train_steps"):
            out[name] = positive_int(f"SynthERConfig.{name}", getattr(self, name), optional=True)
        out["seed"] = check_int("SynthERConfig.seed", self.seed, minimum=0)
        if self.rff_dim % 2:
            raise ValueError(f"SynthERConfig.rff_dim must be even, got {self.rff_dim!r}")
        for name in ("lr", "grad_clip", "sigma_min", "sigma_max", "sigma_data", "rho", "p_std", "s_noise"):
            out[name] = positive_float(f"SynthERConfig.{name}", getattr(self, name))
        for name in ("p_mean", "s_tmin", "s_tmax"):
            out[name] = finite_float(f"SynthERConfig.{name}", getattr(self, name))
        out["s_churn"] = finite_float("SynthERConfig.s_churn", self.s_churn, low=0.0)
        out["train_steps_power"] = finite_float("SynthERConfig.train_steps_power", self.train_steps_power,
                                                low=0.0, high=2.0)
        if out["max_train_steps"] is not None and out["max_train_steps"] < out["train_steps"]:
            raise ValueError(f"SynthERConfig.max_train_steps ({self.max_train_steps}) must be >= train_steps "
                             f"({self.train_steps})")
        if out["s_tmin"] > out["s_tmax"]:   # an empty window: churn silently off
            raise ValueError(f"SynthERConfig.s_tmin ({self.s_tmin}) must be <= s_tmax ({self.s_tmax}); "
                             "s_churn=0 turns churn off")
        if not out["sigma_min"] < out["sigma_max"]:
            raise ValueError(f"SynthERConfig.sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        out["ema_decay"] = finite_float("SynthERConfig.ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        out["real_ratio"] = finite_float("SynthERConfig.real_ratio", self.real_ratio, low=0.0, high=1.0)
        out["outlier_std"] = positive_float("SynthERConfig.outlier_std", self.outlier_std, optional=True)
        for name in ("async_retrain", "compile", "normalize_reward"):
            check_bool(f"SynthERConfig.{name}", getattr(self, name))
        check_bool("SynthERConfig.warm_start", self.warm_start)
        out["warm_start_steps"] = positive_int("SynthERConfig.warm_start_steps", self.warm_start_steps, optional=True)
        check_choice("SynthERConfig.precision", self.precision, PRECISIONS)
        check_choice("SynthERConfig.sampler", self.sampler, SAMPLERS)
        check_choice("SynthERConfig.gradients", self.gradients, GRADIENTS)
        check_choice("SynthERConfig.param_layout", self.param_layout, PARAM_LAYOUTS)
        check_choice("SynthERConfig.retrain_backend", self.retrain_backend, RETRAIN_BACKENDS)
        out.update(self._checked_relevance())
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"SynthERConfig.device must be 'auto' or a torch device string, got {self.device!r}")
        return out

    def _checked_relevance(self) -> dict:
        """Validate the relevance-guided generation fields; return the numeric ones as plain numbers."""
        out = {}
        if callable(self.relevance):
            raise ValueError("SynthERConfig.relevance takes None, 'curiosity' or 'reward'; pass a custom score "
                             "function to the buffer instead: buffer.set_relevance_fn(fn)")
        check_choice("SynthERConfig.relevance", self.relevance, RELEVANCES)
        out["guidance_scale"] = finite_float("SynthERConfig.guidance_scale", self.guidance_scale, low=0.0)
        out["cond_dropout"] = finite_float("SynthERConfig.cond_dropout", self.cond_dropout, low=0.0, high=1.0,
                                           high_open=True)
        if out["cond_dropout"] == 0.0 and out["guidance_scale"] != 1.0:
            raise ValueError(f"SynthERConfig.cond_dropout=0 never trains the unconditional branch that "
                             f"guidance_scale={self.guidance_scale} samples with: use cond_dropout > 0, or "
                             "guidance_scale=1 (the conditional model alone)")
        out["relevance_top_frac"] = finite_float("SynthERConfig.relevance_top_frac", self.relevance_top_frac,
                                                 low=0.0, high=1.0, low_open=True)
        out["relevance_train_steps"] = positive_int("SynthERConfig.relevance_train_steps",
                                                    self.relevance_train_steps, optional=True)
        out["relevance_hidden"] = positive_int("SynthERConfig.relevance_hidden", self.relevance_hidden)
        if self.relevance is not None and self.retrain_backend == "ray":
            raise ValueError("SynthERConfig.relevance is not supported with retrain_backend='ray' yet "
                             "(the relevance model trains in this process): use retrain_backend='thread'")
        return out

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> "SynthERConfig":
        """A copy with ``changes`` applied (``dataclasses.replace`` semantics, validated).

        Raises:
            ValueError: an unknown field, or an invalid value (naming the field).
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"SynthERConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-python dict of all fields (safe for JSON and ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    def matches_record(self, recorded: Any) -> bool:
        """Whether ``recorded`` (a ``to_dict()`` written by an earlier version, e.g. in a benchmark's
        finished unit) describes this config: equal on every recorded field, and every field added to
        ``SynthERConfig`` since (absent from ``recorded``) at its default value."""
        if not isinstance(recorded, dict):
            return False
        current, defaults = self.to_dict(), SynthERConfig().to_dict()
        return set(recorded) <= set(current) and all(
            recorded[k] == v if k in recorded else defaults[k] == v for k, v in current.items())

    @classmethod
    def from_dict(cls, d: dict) -> "SynthERConfig":
        """Inverse of ``to_dict``; fields missing from ``d`` (e.g. added since it was saved) take their
        defaults.

        Raises:
            ValueError: an unknown key, or an invalid value.
        """
        return cls().replace(**d)

    def batch_size_for(self, num_rows: int) -> int:
        """Training batch size for a dataset of ``num_rows`` rows (Table 8 rule when ``batch_size`` is None)."""
        if self.batch_size is not None:
            return self.batch_size
        return 256 if num_rows < 1_000_000 else 1024

    def train_steps_for(self, num_rows: int) -> int:
        """Gradient steps of a fit on ``num_rows`` rows: ``train_steps``, grown by the data-size rule
        (``train_steps_rows``, ``train_steps_power``, ``max_train_steps``) when it is set."""
        n0 = self.train_steps_rows
        if n0 is None or num_rows <= n0:
            return self.train_steps
        steps = int(round(self.train_steps * (num_rows / n0) ** self.train_steps_power))
        return steps if self.max_train_steps is None else min(steps, self.max_train_steps)

    def warm_steps(self, num_rows: Optional[int] = None) -> int:
        """Gradient steps of a warm retrain on ``num_rows`` rows: ``warm_start_steps``, or a quarter of the
        steps a cold fit would take (``train_steps_for(num_rows) // 4``, at least 1), so that warm retrains
        grow with the data like the cold budget (benchmarks/WARM_START.md). Without ``num_rows``:
        ``train_steps // 4``."""
        if self.warm_start_steps is not None:
            return self.warm_start_steps
        cold = self.train_steps if num_rows is None else self.train_steps_for(num_rows)
        return max(1, cold // 4)

    @classmethod
    def for_device(cls, device: str = "auto") -> "SynthERConfig":
        """The preset that suits ``device``: ``"paper"`` where it resolves to CUDA, else ``"fast"``.

        What ``config=None`` means for :class:`~synther_buffer.TransitionDiffusion`, ``GenerativeReplay``,
        ``WrappedReplay`` and ``GenerativeReplayBuffer``: the paper preset trains for hours per retrain on a
        CPU. The choice is logged once per process at INFO, with how to pick another.

        Args:
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; kept as the config's ``device``.
        """
        import torch  # here: this module stays importable without torch

        cuda = device == "cuda" or str(device).startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
        name = "paper" if cuda else "fast"
        if name not in _ANNOUNCED:
            _ANNOUNCED.add(name)
            _log.info("SynthER config=None: the %r preset for %s (pass config=SynthERConfig.preset(...) to choose)",
                      name, "CUDA" if cuda else "CPU")
        return cls.preset(name).replace(device=device)

    @classmethod
    def preset(cls, name: str) -> "SynthERConfig":
        """A named preset: ``"paper"`` (seed Tables 8/9, GPU), ``"fast"`` (2 CPU cores), ``"tiny"`` (tests).

        Raises:
            ValueError: an unknown name.
        """
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def _paper() -> SynthERConfig:
    # Exactly the seed's values (Tables 8, 9; D.2). The defaults of the dataclass are these.
    return SynthERConfig()


def _fast() -> SynthERConfig:
    # 2 CPU cores. Sized by fidelity first, then time: the training length and width that keep the
    # replayed dynamics error near the paper preset's at online dataset sizes, and the cheapest sampler
    # whose error stays within 10% of the paper's 128-step stochastic one (benchmarks/FIDELITY.md;
    # README "Presets"). Above 10K real rows the steps grow as sqrt(rows / 10K), capped at 60K: at a
    # fixed 15K, DMC cheetah-run's dynamics error at 50K-100K rows was 1.7-2.1x its 10K value
    # (benchmarks/FIDELITY.md, "Fidelity as the data grows").
    return SynthERConfig(width=256, depth=4, train_steps=15_000, batch_size=256,
                         train_steps_rows=10_000, train_steps_power=0.5, max_train_steps=60_000,
                         sample_steps=40, sampler="stochastic", sigma_max=5.0, s_tmin=0.01, s_tmax=80.0,
                         retrain_every=5_000, synthetic_size=100_000, num_generate=100_000)


def _tiny() -> SynthERConfig:
    # Seconds on a CPU: unit tests and smoke runs only. Enough training and sampler steps to learn the
    # tests' 2-D Gaussian mixture (fewer sampler steps blur its modes).
    return SynthERConfig(width=128, depth=2, time_dim=32, train_steps=1_000, batch_size=256, lr=1e-3,
                         sample_steps=32, sampler="deterministic",
                         retrain_every=200, synthetic_size=2_000, num_generate=1_000, min_real=100,
                         sample_batch_size=1_000, progress=False)


# the ``--compile`` help of ``synther upsample`` and ``synther train`` (argparse: write a literal % as %%)
COMPILE_HELP = ("torch.compile the diffusion training step (SynthERConfig.compile): faster steps for small "
                "networks on CPU after a one-off compilation per process; needs a C++ compiler, else trains "
                "eagerly")

# the ``--precision`` help of ``synther upsample`` and ``synther train``
PRECISION_HELP = ("matmul precision of the diffusion model (SynthERConfig.precision): fp32 (default, the paper's) "
                  "or bf16 (autocast-style bfloat16 matmuls: faster on GPUs and CPUs with AVX512-BF16 / AMX)")

# the ``--warm-start`` / ``--warm-start-steps`` help of the online CLIs
WARM_START_HELP = ("retrain the diffusion model by continuing from the previous one (SynthERConfig.warm_start): "
                   "the first retrain is a full fit, later ones take --warm-start-steps; default: from scratch "
                   "every retrain (the paper's schedule)")
# what ``warm_start_steps=None`` means, in words (``SynthERConfig.warm_steps``' ``// 4``)
WARM_START_DEFAULT_TEXT = "a quarter of a cold fit's steps"
WARM_START_STEPS_HELP = f"gradient steps of a warm retrain (default: {WARM_START_DEFAULT_TEXT})"

PRESETS = {"paper": _paper, "fast": _fast, "tiny": _tiny}
