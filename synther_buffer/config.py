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
import math
from dataclasses import dataclass
from typing import Any, Optional

_log = logging.getLogger(__name__)
_ANNOUNCED: set = set()   # presets for_device has logged (once per process each)

SAMPLERS = ("stochastic", "deterministic")
PRECISIONS = ("fp32", "bf16")
RETRAIN_BACKENDS = ("thread", "ray")


@dataclass(frozen=True)
class SynthERConfig:
    """Hyperparameters of SynthER. Build with ``SynthERConfig.preset(name)`` and tweak with ``replace``.

    Denoiser (seed B.2, Table 8):
        width: hidden width of the residual MLP.
        depth: number of residual blocks ``x + linear(relu(norm(x)))``.
        rff_dim: random Fourier feature dimension of the noise-level embedding.
        time_dim: width of the noise embedding / input projection (reference code: 128).
    Training:
        train_steps: gradient steps per fit (each retrain trains from scratch).
        batch_size: training batch; ``None`` picks 256 below 1M rows, else 1024 (Table 8).
        lr: Adam learning rate, cosine-annealed to 0 over ``train_steps``.
        ema_decay / ema_every: EMA of the weights (used for sampling), updated every ``ema_every`` steps.
        grad_clip: max global grad norm (reference code: 1.0).
        compile: run the training step's loss and gradients (``synther_buffer/manual_grad.py``) through
            ``torch.compile``. Opt-in: ~15 s of compilation on the first fit of a process (later fits
            of the same shapes reuse it). On 2 CPU cores, width 256: 1.51x the reference stack's
            steps/s vs 1.38x eager (benchmarks/THROUGHPUT.md); at width 1024 no faster than eager.
            Needs a C++ compiler on CPU; if compilation fails the fit warns and trains eagerly.
        precision: ``"fp32"`` (default: the paper's, reproducible) or ``"bf16"``: the denoiser's
            matmuls in bfloat16 for training and sampling, as ``torch.autocast`` does (fp32 weights,
            Adam state, LayerNorm, loss and sampler arithmetic). For CUDA GPUs with bf16 support and
            CPUs with AVX512-BF16 / AMX (elsewhere it works but is slower than fp32). Measured cost
            and speed: benchmarks/THROUGHPUT.md, benchmarks/FIDELITY.md.
    EDM (Karras et al. 2022):
        sigma_min, sigma_max, sigma_data, rho: noise range, data scale and schedule curvature (eq. 5).
        p_mean, p_std: log-normal training noise distribution.
    Sampler (Table 9):
        sample_steps: number of noise levels N.
        sampler: ``"stochastic"`` (Algorithm 2 with churn) or ``"deterministic"`` (Heun, Algorithm 1).
        s_churn, s_tmin, s_tmax, s_noise: stochasticity of Algorithm 2.
        sample_batch_size: rows denoised at once (memory bound), ``None`` = 100K on CUDA, 16K on CPU.
    Online schedule (seed D.2):
        retrain_every: env steps (transitions added, n_envs per vector step) between retrains.
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
    Misc:
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
    batch_size: Optional[int] = None
    lr: float = 3e-4
    ema_decay: float = 0.995
    ema_every: int = 10
    grad_clip: float = 1.0
    compile: bool = False
    precision: str = "fp32"
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
    # misc
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        positive_ints = ("width", "depth", "rff_dim", "time_dim", "train_steps", "ema_every",
                         "sample_steps", "retrain_every", "synthetic_size", "num_generate")
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SynthERConfig.{name} must be a positive int, got {v!r}")
        for name in ("batch_size", "sample_batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"SynthERConfig.{name} must be None or a positive int, got {v!r}")
        if isinstance(self.min_real, bool) or not isinstance(self.min_real, int) or self.min_real < 1:
            raise ValueError(f"SynthERConfig.min_real must be a positive int, got {self.min_real!r}")
        if self.rff_dim % 2:
            raise ValueError(f"SynthERConfig.rff_dim must be even, got {self.rff_dim!r}")
        positive_floats = ("lr", "grad_clip", "sigma_min", "sigma_max", "sigma_data", "rho", "p_std",
                           "s_noise")
        for name in positive_floats:
            v = getattr(self, name)
            if not _is_real(v) or not v > 0:
                raise ValueError(f"SynthERConfig.{name} must be a positive number, got {v!r}")
        for name in ("p_mean", "s_churn", "s_tmin", "s_tmax"):
            v = getattr(self, name)
            if not _is_real(v):
                raise ValueError(f"SynthERConfig.{name} must be a finite number, got {v!r}")
        if self.s_churn < 0:
            raise ValueError(f"SynthERConfig.s_churn must be >= 0, got {self.s_churn!r}")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"SynthERConfig.sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        if not _is_real(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"SynthERConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not _is_real(self.real_ratio) or not 0.0 <= self.real_ratio <= 1.0:
            raise ValueError(f"SynthERConfig.real_ratio must be in [0, 1], got {self.real_ratio!r}")
        if self.outlier_std is not None and (not _is_real(self.outlier_std) or self.outlier_std <= 0):
            raise ValueError(f"SynthERConfig.outlier_std must be None or > 0, got {self.outlier_std!r}")
        if not isinstance(self.async_retrain, bool):
            raise ValueError(f"SynthERConfig.async_retrain must be a bool, got {self.async_retrain!r}")
        if self.retrain_backend not in RETRAIN_BACKENDS:
            raise ValueError(f"SynthERConfig.retrain_backend must be one of {RETRAIN_BACKENDS}, "
                             f"got {self.retrain_backend!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"SynthERConfig.compile must be a bool, got {self.compile!r}")
        if not isinstance(self.normalize_reward, bool):
            raise ValueError(f"SynthERConfig.normalize_reward must be a bool, got {self.normalize_reward!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SynthERConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"SynthERConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"SynthERConfig.device must be 'auto' or a torch device string, got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SynthERConfig.seed must be an int, got {self.seed!r}")

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> "SynthERConfig":
        """Return a copy with ``changes`` applied (``dataclasses.replace`` semantics, validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"SynthERConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-python dict of all fields (safe for JSON and ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SynthERConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        return cls().replace(**d)

    def batch_size_for(self, num_rows: int) -> int:
        """Training batch size for a dataset of ``num_rows`` rows (Table 8 rule when ``batch_size`` is None)."""
        if self.batch_size is not None:
            return self.batch_size
        return 256 if num_rows < 1_000_000 else 1024

    @classmethod
    def for_device(cls, device: str = "auto") -> "SynthERConfig":
        """The preset that suits ``device``: ``"paper"`` where it resolves to CUDA, else ``"fast"``.

        What ``config=None`` means for :class:`~synther_buffer.TransitionDiffusion`, ``GenerativeReplay``,
        ``WrappedReplay`` and ``GenerativeReplayBuffer``: the paper preset trains for hours per retrain on a
        CPU. The choice is logged once per process at INFO, with how to pick another.
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
        """A named preset: ``"paper"`` (seed Tables 8/9, GPU), ``"fast"`` (2 CPU cores), ``"tiny"`` (tests)."""
        try:
            return PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _paper() -> SynthERConfig:
    # Exactly the seed's values (Tables 8, 9; D.2). The defaults of the dataclass are these.
    return SynthERConfig()


def _fast() -> SynthERConfig:
    # CPU preset, sized by fidelity first, then time (see README "Presets" for the measurements).
    # Measured here (2 cores, dim 41, 10K rows; benchmarks/FIDELITY.md): 15K steps at ~116 steps/s
    # (quiet machine) ~130 s. Sampler: the cheapest setting found whose dynamics error replayed in
    # MuJoCo (HalfCheetah-v5, 40K rows per setting) is within 10% of the paper's 128-step stochastic
    # sampler: 40-step stochastic with sigma_max 5 and churn over sigma in [0.01, 80], 0.0545 vs 0.0497
    # (+9.7%) at 3.1x its samples/s. The previous 32-step stochastic (sigma_max 80, churn in [0.05, 50])
    # scored 0.072 on the same model; 32-step deterministic 0.107 in an earlier run.
    return SynthERConfig(width=256, depth=4, train_steps=15_000, batch_size=256,
                         sample_steps=40, sampler="stochastic", sigma_max=5.0, s_tmin=0.01, s_tmax=80.0,
                         retrain_every=5_000, synthetic_size=100_000, num_generate=100_000)


def _tiny() -> SynthERConfig:
    # Seconds on a CPU: unit tests and smoke runs only.
    # Learns a 2-D Gaussian mixture in ~3 s (32 sampler steps; 8 steps visibly blurred it).
    return SynthERConfig(width=128, depth=2, time_dim=32, train_steps=1_000, batch_size=256, lr=1e-3,
                         sample_steps=32, sampler="deterministic",
                         retrain_every=200, synthetic_size=2_000, num_generate=1_000, min_real=100,
                         sample_batch_size=1_000, progress=False)


# the ``--compile`` help of ``synther upsample`` and ``synther train`` (argparse: %% is a literal %)
COMPILE_HELP = ("torch.compile the diffusion training step (SynthERConfig.compile): ~10%% more steps/s at "
                "width 256 on CPU (more on a contended machine) after ~15 s of compilation; needs a C++ "
                "compiler, else trains eagerly")

# the ``--precision`` help of ``synther upsample`` and ``synther train``
PRECISION_HELP = ("matmul precision of the diffusion model (SynthERConfig.precision): fp32 (default, the paper's) "
                  "or bf16 (autocast-style bfloat16 matmuls: faster on GPUs and CPUs with AVX512-BF16 / AMX)")

PRESETS = {"paper": _paper, "fast": _fast, "tiny": _tiny}
