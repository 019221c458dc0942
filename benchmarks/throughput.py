"""Throughput of synther_buffer against the reference stack, side by side in one run.

    python -m benchmarks.throughput [--quick] [--threads N] [--device auto|cpu|cuda] [--out results/throughput]

Ours: ``TransitionDiffusion.fit`` (training steps/s) and ``TransitionDiffusion.sample`` (samples/s).
The peer: the stack the SynthER reference code used -- lucidrains ``denoising-diffusion-pytorch``
``ElucidatedDiffusion`` driven like SynthER's ``Trainer.train`` (AdamW betas (0.9, 0.99), weight
decay 0 (= Adam), grad-norm clip 1.0, ``ema_pytorch.EMA(beta=0.995, update_every=10)`` updated every
step, ``loss.item()`` every step, cosine LR). Its network is OUR ``ResidualMLPDenoiser`` (same width,
depth, RFF and time dims), so both sides run the identical network and only the machinery around it
differs. Flat rows [B, D] are fed to lucidrains' image-shaped class as ``D``-channel 1x1 "images"
([B, D, 1, 1]; the wrapper reshapes to [B, D] for the MLP), the way SynthER's adapted copy of the
class fed ``event_shape=[D]`` vectors.

Methodology (2 shared cores: absolute numbers are noisy, ratios are the result):
  * ours and the peer are measured INTERLEAVED (A B A B ...), ``--repeats`` times, median reported;
  * training steps/s excludes setup: each side runs K1 and K2 steps (same K for both, setup
    included in both) and the rate is (K2 - K1) / (t(K2) - t(K1)), per repeat, then the median;
  * sampling: one batch of ``n`` rows (same n, same sampler steps for both), rows/s;
  * extra training rows "ours: torch.compile" (``SynthERConfig.compile=True``, opt-in) at the online
    batch size; compilation happens in an untimed warm-up fit (``--no-compile`` skips these rows);
  * rows "bf16" (``SynthERConfig.precision="bf16"``, opt-in) at the online batch size and for the
    paper's 128-step sampler, when the device has native bfloat16 matmuls (``--no-bf16`` skips them):
    ours with bfloat16 matmuls, and the peer under ``torch.autocast(bfloat16)`` (the same precision, as
    its trainer's mixed-precision option would run it); "% peak" of these rows is of a bfloat16
    ``torch.mm`` peak, sampled beside the fp32 one;
  * a context row "ours: autograd" at w256/b256: our loop with autograd instead of the hand-written
    gradients of ``synther_buffer/manual_grad.py`` (``--no-autograd`` skips it);
  * machine peak: a large fp32 ``torch.mm`` at the same thread count, sampled between repeats;
    "matmuls alone": the training step's matmuls (same shapes) and nothing else, as % of that peak --
    the ceiling for "% peak" of a training row; "matmuls + Adam": the same plus ``fit``'s clipped fused
    Adam step over as many parameters -- the ceiling for any step that keeps an fp32 Adam;
    model FLOPs counted analytically: 2 * (Linear weights) per row per forward, x3 for training.
  * replay latency: ``GenerativeReplayBuffer.sample(256)`` (real data added, synthetic pool filled
    by a real retrain) vs plain SB3 ``ReplayBuffer.sample(256)`` on the same real data.
  * memory: in a fresh process, RSS and peak RSS (Linux VmHWM, reset per stage) of a ``GenerativeReplay``
    whose retrain fills a 1M-row x 41 pool, then over 2,000 ``sample(256)`` calls.

The peer is a benchmark-only extra (``pip install --no-deps denoising-diffusion-pytorch einops
ema-pytorch``; its package ``__init__`` imports torchvision, so ``elucidated_diffusion.py`` is loaded
by file path). Without it the peer columns are empty.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

from synther_buffer.config import SynthERConfig
from synther_buffer.denoiser import ResidualMLPDenoiser
from synther_buffer.diffusion import TransitionDiffusion, bf16_is_native, resolve_device
from synther_buffer.flat import clipped_adam_step
from synther_buffer.train_step import fused_adam, matmul_autocast

DIM = 41            # HalfCheetah: 17 obs + 6 action + 1 reward + 17 next_obs
OBS_DIM, ACT_DIM = 17, 6
N_ROWS = 10_000

# ---------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()`` (device synchronised)."""
    return _timed2(fn, device)[0]


def _timed2(fn: Callable[[], object], device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds) of ``fn()``. At one thread CPU time does not advance
    while other processes hold the core, so it is the steadier measure on a shared machine."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _median(xs: List[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def apply_mallopt() -> bool:
    """glibc only: serve every allocation from the heap and never trim it (``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` = 1 GiB), like ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``. Eager
    torch on CPU allocates a fresh multi-MB tensor per op; by default glibc mmaps (and page-faults)
    each of them. Applies to the whole process, so to ours and the peer alike."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, ctypes.c_int(1 << 30))) and bool(libc.mallopt(-1, ctypes.c_int(1 << 30)))
    except (OSError, AttributeError):
        return False


def linear_flops_per_row(net: nn.Module) -> int:
    """Multiply-add FLOPs of one forward pass per row: 2 * sum of Linear weight sizes."""
    return 2 * sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))


def matmul_peak_gflops(device: torch.device, n: int, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``reps`` GFLOP/s of an [n, n] @ [n, n] torch.mm in ``dtype`` (fp32: TF32 as configured,
    off by default)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    inner = 1 if device.type == "cpu" else 10
    best = float("inf")
    for _ in range(reps):
        dt = _timed(lambda: [torch.mm(a, b, out=c) for _ in range(inner)], device) / inner
        best = min(best, dt)
    return 2 * n ** 3 / best / 1e9


def matmul_floor_gflops(net: nn.Module, batch: int, device: torch.device, steps: int, reps: int = 3,
                        with_adam: bool = False) -> float:
    """GFLOP/s of the matmuls of ``steps`` training steps and nothing else: per Linear of ``net``, the
    forward ``addmm`` and the backward's weight- and input-gradient ``mm`` at ``batch`` rows (the
    shapes and transposes of ``synther_buffer/manual_grad.py``). Best of ``reps``, like the peak: the
    most a training step of this network could reach on this machine.

    ``with_adam``: each step also takes ``fit``'s optimizer step (clipped fused Adam,
    ``synther_buffer/flat.py``) over a flat tensor of ``net``'s parameter count, gradient norm below
    the clip as in a real fit: the most any step with an fp32 Adam could reach."""
    ops = []
    for m in (m for m in net.modules() if isinstance(m, nn.Linear)):
        ops.append((torch.randn(batch, m.in_features, device=device), torch.randn(batch, m.out_features, device=device),
                    m.weight.detach(), m.bias.detach(), torch.empty_like(m.weight)))
    if with_adam:
        n = sum(p.numel() for p in net.parameters())
        flat = nn.Parameter(torch.zeros(n, device=device))
        flat.grad = torch.randn(n, device=device) * (0.3 / n ** 0.5)  # norm ~0.3 < the clip of 1.0
        opt = fused_adam([flat], 3e-4)

    def run():
        for _ in range(steps):
            for a, dz, w, b, gw in ops:
                torch.addmm(b, a, w.t())
            for a, dz, w, b, gw in reversed(ops):
                torch.mm(dz.t(), a, out=gw)
                torch.mm(dz, w)
            if with_adam:
                clipped_adam_step(opt, [flat], 1.0)

    run()  # warm-up
    best = min(_timed(run, device) for _ in range(reps))
    return steps * 3 * linear_flops_per_row(net) * batch / best / 1e9


# ---------------------------------------------------------------------------------------- the peer


def load_peer():
    """lucidrains' ``elucidated_diffusion`` module loaded by file path (the package ``__init__`` is
    not executed: it imports torchvision), plus ``ema_pytorch.EMA``. None when not installed."""
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    path = pkg_dir / "elucidated_diffusion.py"
    if not path.is_file():
        return None
    source = path.read_text()
    if "denoising_diffusion_pytorch" in source or "from ." in source:
        # Sibling imports: a bare package object lets them resolve without running __init__.
        if "denoising_diffusion_pytorch" not in sys.modules:
            stub = types.ModuleType("denoising_diffusion_pytorch")
            stub.__path__ = [str(pkg_dir)]
            sys.modules["denoising_diffusion_pytorch"] = stub
    mspec = importlib.util.spec_from_file_location("denoising_diffusion_pytorch.elucidated_diffusion", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    mod.tqdm = lambda it, *a, **k: it  # no progress bars inside timed sampling
    try:
        from ema_pytorch import EMA
    except ImportError:
        EMA = SimpleEMA
    mod.BENCH_EMA = EMA
    mod.BENCH_VERSION = _dist_version("denoising-diffusion-pytorch")
    return mod


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:
        return None


class SimpleEMA(nn.Module):
    """Fallback when ema_pytorch is missing: the same update rule (per-parameter python loop,
    warm-up copy until step 100, decay 1 - (1 + epoch)^(-2/3) capped at beta, every 10 steps)."""

    def __init__(self, model: nn.Module, beta: float = 0.9999, update_after_step: int = 100, update_every: int = 10):
        super().__init__()
        self.online_model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.beta, self.update_after_step, self.update_every = beta, update_after_step, update_every
        self.register_buffer("step", torch.tensor(0))

    @torch.no_grad()
    def update(self) -> None:
        step = int(self.step.item())
        self.step += 1
        if step % self.update_every:
            return
        pairs = zip(self.ema_model.parameters(), self.online_model.parameters())
        if step <= self.update_after_step:
            for e, p in pairs:
                e.copy_(p)
            return
        epoch = max(step - self.update_after_step - 1, 0)
        decay = min(self.beta, 1 - (1 + epoch) ** (-2 / 3)) if epoch > 0 else 0.0
        for e, p in pairs:
            e.lerp_(p, 1 - decay)


class PeerNet(nn.Module):
    """OUR ResidualMLPDenoiser behind lucidrains' net interface: ``forward(x [B, D, 1, 1], time [B],
    self_cond) -> [B, D, 1, 1]`` (SynthER fed the class flat vectors; here they are D-channel 1x1 images)."""

    random_or_learned_sinusoidal_cond = True
    self_condition = False

    def __init__(self, net: ResidualMLPDenoiser):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, time: torch.Tensor, x_self_cond=None) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1), time).reshape(x.shape)


def build_peer(peer, cfg: SynthERConfig, device: torch.device, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResidualMLPDenoiser(DIM, cfg.width, cfg.depth, cfg.rff_dim, cfg.time_dim)
    diffusion = peer.ElucidatedDiffusion(
        PeerNet(net), image_size=1, channels=DIM, num_sample_steps=cfg.sample_steps,
        sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data, rho=cfg.rho,
        P_mean=cfg.p_mean, P_std=cfg.p_std, S_churn=cfg.s_churn, S_tmin=cfg.s_tmin, S_tmax=cfg.s_tmax,
        S_noise=cfg.s_noise)
    return diffusion.to(device)


def peer_fit(peer, cfg: SynthERConfig, images: torch.Tensor, steps: int, batch: int,
             device: torch.device, loader: str = "index"):
    """SynthER's ``Trainer.train`` loop (accelerate, wandb and tqdm removed) on the peer class.

    ``images``: [N, D, 1, 1] in lucidrains' [0, 1] convention (its forward maps to [-1, 1]).
    ``loader``: "index" (random rows by indexing, least overhead) or "dataloader" (the reference's
    shuffled ``DataLoader(TensorDataset)``, in-process: num_workers=0).
    Returns the EMA wrapper (``.ema_model`` samples).
    """
    diffusion = build_peer(peer, cfg, device)
    ema = peer.BENCH_EMA(diffusion, beta=cfg.ema_decay, update_every=cfg.ema_every)
    no_decay = ["bias", "LayerNorm.weight", "norm.weight", ".g"]
    groups = [
        {"params": [p for n, p in diffusion.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
        {"params": [p for n, p in diffusion.named_parameters() if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = images.shape[0]
    if loader == "dataloader":
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images.cpu()), batch_size=batch,
                                         shuffle=True, pin_memory=device.type == "cuda", num_workers=0)

        def batches():
            while True:
                for (d,) in dl:
                    yield d
        it = batches()
        next_batch = lambda: next(it).to(device)  # noqa: E731
    else:
        next_batch = lambda: images[torch.randint(n, (batch,), device=device)]  # noqa: E731
    diffusion.train()
    for _ in range(steps):
        data = next_batch()
        loss = diffusion(data)
        total_loss = loss.item()  # noqa: F841  (the reference logs it every step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        ema.update()
        sched.step()
    return ema


def peer_sample(ema_model, n: int, steps: int) -> torch.Tensor:
    ema_model.eval()
    return ema_model.sample(batch_size=n, num_sample_steps=steps, clamp=False)


# ---------------------------------------------------------------------------------------- sizes


def plan(quick: bool, device: torch.device) -> dict:
    if quick:
        return dict(models=[(64, 2)], batches=[64], rows=512, repeats=1, target_s=0.05,
                    sample_steps=[("stochastic", 4), ("deterministic", 4)], sample_rows=(32, 32), sample_target_s=0.05,
                    peak_n=256, buf_real=500, buf_pool=1_000, buf_calls=50, buf_blocks=2,
                    min_steps=3, memory_rows=20_000)
    big = device.type == "cuda"
    return dict(models=[(256, 4), (1024, 6)], batches=[256, 1024], rows=N_ROWS, repeats=3 if not big else 5,
                target_s=4.0 if not big else 2.0, sample_target_s=8.0 if not big else 2.0,
                sample_steps=[("stochastic", 128), ("deterministic", 32)],
                sample_rows=(64, 16_384) if not big else (1_024, 100_000),
                peak_n=2048 if not big else 8192, buf_real=20_000, buf_pool=100_000, buf_calls=500,
                buf_blocks=5, min_steps=10, memory_rows=1_000_000)


def model_cfg(width: int, depth: int, device: torch.device, quick: bool) -> SynthERConfig:
    base = SynthERConfig.preset("paper")
    if quick:
        base = base.replace(time_dim=32)
    return base.replace(width=width, depth=depth, device=str(device), progress=False,
                        sample_batch_size=None)


# ---------------------------------------------------------------------------------------- benches


def bench_train(peer, width: int, depth: int, batch: int, x: np.ndarray, images: Optional[torch.Tensor],
                p: dict, device: torch.device, quick: bool, peak_samples: List[float], loader: str,
                compile: bool = False, gradients: str = "manual", precision: str = "fp32") -> dict:
    """One training row; ``gradients="autograd"`` runs our loop without ``manual_grad`` (context row);
    ``precision="bf16"``: ours with ``SynthERConfig.precision="bf16"``, the peer under autocast."""
    if gradients not in ("manual", "autograd"):
        raise ValueError(f"gradients must be 'manual' or 'autograd', got {gradients!r}")
    cfg = model_cfg(width, depth, device, quick).replace(batch_size=batch, train_steps=10, compile=compile,
                                                         precision=precision, gradients=gradients)
    bf16 = precision == "bf16"

    def peer_run(k):
        with matmul_autocast(device, precision):
            return peer_fit(peer, cfg, images, k, batch, device, loader)

    ours = TransitionDiffusion(DIM, cfg)
    flops_row = linear_flops_per_row(ours.model)
    # Warm-up both (allocator, kernels; with compile=True the compilation) and estimate the step
    # time to size K.
    w = p["min_steps"]
    if compile:
        torch.compiler.reset()  # static kernels for this row's shapes, as in a fresh process
        ours.fit(x, steps=w, progress=False)
    t_ours = _timed(lambda: ours.fit(x, steps=w, progress=False), device)
    t_peer = _timed(lambda: peer_run(w), device) if peer else t_ours
    step_s = max(min(t_ours, t_peer) / w, 1e-6)
    k2 = max(2 * p["min_steps"], int(p["target_s"] / step_s))
    floor_steps = max(1, int(p["target_s"] / 8 / step_s))
    # the floors are fp32 matmuls: no ceiling for a bf16 row
    floor = None if bf16 else matmul_floor_gflops(ours.model, batch, device, steps=floor_steps)
    floor_adam = None if bf16 else matmul_floor_gflops(ours.model, batch, device, steps=floor_steps, with_adam=True)
    k1 = max(1, k2 // 4)
    runs = {"ours": {k1: [], k2: []}, "peer": {k1: [], k2: []}}
    for _ in range(p["repeats"]):
        for k in (k1, k2):  # A B A B
            runs["ours"][k].append(_timed2(lambda: ours.fit(x, steps=k, progress=False), device))
            if peer:
                runs["peer"][k].append(_timed2(lambda: peer_run(k), device))
        if not bf16:
            peak_samples.append(matmul_peak_gflops(device, p["peak_n"], reps=2))

    def rates(side, j):  # j = 0: wall clock, 1: CPU time
        r = runs[side]
        return [(k2 - k1) / (b[j] - a[j]) if b[j] > a[j] else float("nan") for a, b in zip(r[k1], r[k2])]

    ours_rates, peer_rates = rates("ours", 0), rates("peer", 0) if peer else []
    ours_cpu, peer_cpu = rates("ours", 1), rates("peer", 1) if peer else []
    row = dict(kind="train", width=width, depth=depth, batch=batch, k1=k1, k2=k2,
               flops_per_step=3 * flops_row * batch, params=sum(pp.numel() for pp in ours.model.parameters()),
               ours_rate=_median(ours_rates), peer_rate=_median(peer_rates) if peer else None,
               ours_rates=ours_rates, peer_rates=peer_rates, ours_cpu_rates=ours_cpu, peer_cpu_rates=peer_cpu,
               unit="steps/s", peer_loader=loader, compile=compile, gradients=ours.last_fit["gradients"],
               precision=precision,
               floor_gflops=floor, floor_adam_gflops=floor_adam)
    return row


def bench_sample(peer, width: int, depth: int, sampler: str, steps: int, x: np.ndarray,
                 images: Optional[torch.Tensor], p: dict, device: torch.device, quick: bool,
                 peak_gflops: float, loader: str, precision: str = "fp32") -> dict:
    cfg = model_cfg(width, depth, device, quick).replace(
        batch_size=min(256, x.shape[0]), sample_steps=steps, sampler=sampler,
        s_churn=80.0 if sampler == "stochastic" else 0.0, precision=precision)

    def peer_run(m):
        with matmul_autocast(device, precision):
            return peer_sample(ema.ema_model, m, steps)

    ours = TransitionDiffusion(DIM, cfg)
    ours.fit(x, steps=p["min_steps"], progress=False)
    flops_row = linear_flops_per_row(ours.model)
    nfe = 2 * steps - 1
    # rows per call: what ~target_s takes at ~30% of peak, clipped, a multiple of 16
    lo, hi = p["sample_rows"]
    n = int(p["sample_target_s"] * 0.3 * peak_gflops * 1e9 / (flops_row * nfe))
    n = max(lo, min(hi, n // 16 * 16))
    ema = peer_fit(peer, cfg, images, p["min_steps"], cfg.batch_size, device, loader) if peer else None
    # warm-up
    ours.sample(min(n, 64), batch_size=n, progress=False)
    if peer:
        peer_run(min(n, 64))
    times = {"ours": [], "peer": []}
    for _ in range(p["repeats"]):  # A B A B
        times["ours"].append(_timed2(lambda: ours.sample(n, batch_size=n, progress=False), device))
        if peer:
            times["peer"].append(_timed2(lambda: peer_run(n), device))
    rates = {side: [n / t[0] for t in ts] for side, ts in times.items()}
    cpu = {side: [n / t[1] if t[1] > 0 else float("nan") for t in ts] for side, ts in times.items()}
    return dict(kind="sample", width=width, depth=depth, sampler=sampler, sample_steps=steps, rows=n,
                flops_per_row=flops_row * nfe, ours_rate=_median(rates["ours"]),
                peer_rate=_median(rates["peer"]) if peer else None, ours_rates=rates["ours"],
                peer_rates=rates["peer"], ours_cpu_rates=cpu["ours"], peer_cpu_rates=cpu["peer"],
                unit="samples/s", precision=precision)


def bench_buffer(p: dict, device: torch.device) -> dict:
    """Microseconds per ``sample(256)``: GenerativeReplayBuffer (filled pool) vs SB3 ReplayBuffer."""
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer

    from synther_buffer.sb3 import GenerativeReplayBuffer

    obs_space = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    act_space = spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
    n_real, n_pool = p["buf_real"], p["buf_pool"]
    cfg = SynthERConfig.preset("tiny").replace(
        device=str(device), train_steps=50, sample_steps=4, retrain_every=10 ** 9, min_real=1,
        synthetic_size=n_pool, num_generate=n_pool, sample_batch_size=n_pool, progress=False)
    gen = GenerativeReplayBuffer(n_real, obs_space, act_space, device=device, config=cfg, model_terminals=False)
    plain = ReplayBuffer(n_real, obs_space, act_space, device=device)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((n_real + 1, OBS_DIM)).astype(np.float32)
    act = rng.uniform(-1, 1, (n_real, ACT_DIM)).astype(np.float32)
    rew = rng.standard_normal(n_real).astype(np.float32)
    for i in range(n_real):
        done = np.array([i % 1000 == 999])
        info = [{"TimeLimit.truncated": bool(done[0])}]
        for buf in (gen, plain):
            buf.add(obs[i:i + 1], obs[i + 1:i + 2], act[i:i + 1], rew[i:i + 1], done, info)
    t0 = time.perf_counter()
    gen.retrain()
    retrain_s = time.perf_counter() - t0
    num_syn = gen.stats()["num_synthetic"]
    bs, calls = 256, p["buf_calls"]

    def block(buf) -> float:
        buf.sample(bs)
        _sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            buf.sample(bs)
        _sync(device)
        return (time.perf_counter() - t) / calls * 1e6

    times = {"ours": [], "plain": []}
    for _ in range(p["buf_blocks"]):
        times["ours"].append(block(gen))
        times["plain"].append(block(plain))
    ours_us, plain_us = _median(times["ours"]), _median(times["plain"])
    return dict(kind="buffer", batch=bs, num_real=n_real, num_synthetic=num_syn, retrain_s=retrain_s,
                ours_us=ours_us, plain_us=plain_us, ratio=ours_us / plain_us,
                ours_samples=times["ours"], plain_samples=times["plain"])


# ---------------------------------------------------------------------------------------- memory
def _rss_mb() -> dict:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, in MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss": out.get("VmRSS"), "peak": out.get("VmHWM")}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(pool_rows: int, real_rows: int = 10_000, sample_calls: int = 2_000) -> dict:
    """Peak and resident memory of a ``GenerativeReplay`` holding a ``pool_rows`` x 41 synthetic pool.

    Runs in its own process (see ``bench_memory``). Stages: the buffer with ``real_rows`` real rows;
    one retrain that generates ``pool_rows`` rows (a ``tiny`` denoiser with 4 sampler steps: the pool's
    size, not the model, is what is measured); ``sample_calls`` x ``sample(256)``.
    """
    from synther_buffer.replay import GenerativeReplay

    torch.set_num_threads(1)
    cfg = SynthERConfig.preset("tiny").replace(
        device="cpu", train_steps=20, sample_steps=4, retrain_every=10 ** 9, min_real=1, outlier_std=None,
        synthetic_size=pool_rows, num_generate=pool_rows, progress=False)
    buf = GenerativeReplay(OBS_DIM, ACT_DIM, capacity=real_rows, config=cfg, model_terminals=False)
    rng = np.random.default_rng(0)
    buf.add(rng.standard_normal((real_rows, OBS_DIM)), rng.uniform(-1, 1, (real_rows, ACT_DIM)),
            rng.standard_normal(real_rows), rng.standard_normal((real_rows, OBS_DIM)), np.zeros(real_rows))
    before = _rss_mb()
    resettable = _reset_peak_rss()
    buf.retrain()
    after_retrain = _rss_mb()
    pool = buf.pool.pool
    _reset_peak_rss()
    for _ in range(sample_calls):
        buf.sample(256)
    after_sample = _rss_mb()
    return {"pool_rows": int(pool.shape[0]), "dim": int(pool.shape[1]), "dtype": str(pool.dtype).replace("torch.", ""),
            "pool_mb": pool.numel() * pool.element_size() / 2 ** 20, "peak_reset_supported": resettable,
            "rss_before_mb": before["rss"], "rss_after_retrain_mb": after_retrain["rss"],
            "peak_during_retrain_mb": after_retrain["peak"], "rss_after_sampling_mb": after_sample["rss"],
            "peak_during_sampling_mb": after_sample["peak"], "sample_calls": sample_calls}


def bench_memory(pool_rows: int) -> dict:
    """``memory_probe`` in a fresh interpreter (peak RSS is per process), returned as a dict."""
    import subprocess

    code = ("import json, sys; from benchmarks.throughput import memory_probe; "
            f"print(json.dumps(memory_probe({int(pool_rows)})))")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["kind"] = "memory"
    return res


# ---------------------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    threads = args.threads or _cores()
    torch.set_num_threads(threads)
    mallopt = apply_mallopt() if args.mallopt else False
    p = plan(args.quick, device)
    if args.repeats:
        p["repeats"] = args.repeats
    peer = None if args.no_peer else load_peer()
    t_start = time.perf_counter()
    load_before = _loadavg()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((p["rows"], DIM)).astype(np.float32) * 2.0 + 0.5
    # the peer trains on the same standardised rows, in lucidrains' [0, 1] image convention
    xn = (x - x.mean(0)) / x.std(0)
    images = torch.as_tensor((xn + 1) / 2, dtype=torch.float32, device=device).reshape(-1, DIM, 1, 1)

    peak_samples = [matmul_peak_gflops(device, p["peak_n"])]
    with_bf16 = not args.no_bf16 and bf16_is_native(device)
    peak_bf16_samples = [matmul_peak_gflops(device, p["peak_n"], dtype=torch.bfloat16)] if with_bf16 else []
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    train_rows, sample_rows = [], []
    # (width, depth, batch, peer loader, ours compiled, ours gradients, precision)
    jobs = [(w, d, b, args.peer_loader, False, "manual", "fp32") for (w, d) in p["models"] for b in p["batches"]]
    w0, d0, b0 = *p["models"][0], p["batches"][0]
    if peer and not args.quick and args.peer_loader == "index":
        # context row: the peer fed by the reference trainer's shuffled DataLoader (in-process)
        jobs.insert(1, (w0, d0, b0, "dataloader", False, "manual", "fp32"))
    if not args.quick and not args.no_autograd:
        # context row: our loop on autograd (what the hand-written gradients replaced)
        jobs.insert(1, (w0, d0, b0, args.peer_loader, False, "autograd", "fp32"))
    if not args.quick and not args.no_compile:
        # ours with SynthERConfig.compile=True (opt-in), at the online batch size, after each eager row
        for (w, d) in p["models"]:
            i = max(i for i, j in enumerate(jobs) if j[:3] == (w, d, b0))
            jobs.insert(i + 1, (w, d, b0, args.peer_loader, True, "manual", "fp32"))
    if with_bf16:
        # SynthERConfig.precision="bf16" (opt-in), at the online batch size, after each eager row
        for (w, d) in p["models"]:
            i = min(i for i, j in enumerate(jobs) if j[:3] == (w, d, b0))
            jobs.insert(i + 1, (w, d, b0, args.peer_loader, False, "manual", "bf16"))
    for (w, d, b, loader, comp, grads, prec) in jobs:
        r = bench_train(peer, w, d, b, x, images, p, device, args.quick, peak_samples, loader, comp, grads, prec)
        log(f"train w{w}/d{d} b{b} (peer {loader}{', ours compiled' if comp else ''}"
            f"{', ours autograd' if grads == 'autograd' else ''}{', both bf16' if prec == 'bf16' else ''}): "
            f"ours {r['ours_rate']:.1f} peer {_f(r['peer_rate'])} steps/s")
        train_rows.append(r)
    peak = _median(peak_samples)
    sample_jobs = [(w, d, sampler, steps, "fp32") for (w, d) in p["models"] for sampler, steps in p["sample_steps"]]
    if with_bf16:  # the paper's sampler (the first setting) in bf16, after its fp32 row
        for (w, d) in p["models"]:
            sampler, steps = p["sample_steps"][0]
            sample_jobs.insert(sample_jobs.index((w, d, sampler, steps, "fp32")) + 1, (w, d, sampler, steps, "bf16"))
    for (w, d, sampler, steps, prec) in sample_jobs:
        r = bench_sample(peer, w, d, sampler, steps, x, images, p, device, args.quick, peak, args.peer_loader, prec)
        log(f"sample w{w}/d{d} {sampler}-{steps}{' (both bf16)' if prec == 'bf16' else ''}: "
            f"ours {r['ours_rate']:.1f} peer {_f(r['peer_rate'])} rows/s")
        sample_rows.append(r)
    peak_samples.append(matmul_peak_gflops(device, p["peak_n"]))
    peak = _median(peak_samples)
    if with_bf16:
        peak_bf16_samples.append(matmul_peak_gflops(device, p["peak_n"], dtype=torch.bfloat16))
    peak_bf16 = _median(peak_bf16_samples) if with_bf16 else None
    buffer = None if args.no_buffer else bench_buffer(p, device)
    memory = None if args.no_memory else bench_memory(p["memory_rows"])

    for r in train_rows + sample_rows:
        fl = r["flops_per_step"] if r["kind"] == "train" else r["flops_per_row"]
        # ours/peer: median over repeats of the paired (same-repeat) ratios, robust to load drifting
        # between repeats; ratio_cpu: the same from CPU-time rates.
        r["ratio"] = _median([a / b for a, b in zip(r["ours_rates"], r["peer_rates"])]) if r["peer_rate"] else None
        r["ratio_cpu"] = _median([a / b for a, b in zip(r["ours_cpu_rates"], r["peer_cpu_rates"])]) \
            if r["peer_rate"] else None
        pk = peak_bf16 if r.get("precision") == "bf16" else peak  # % of the peak of the row's precision
        r["ours_peak_frac"] = r["ours_rate"] * fl / (pk * 1e9)
        r["peer_peak_frac"] = r["peer_rate"] * fl / (pk * 1e9) if r["peer_rate"] else None
        r["floor_peak_frac"] = r["floor_gflops"] / peak if r.get("floor_gflops") else None
        r["floor_adam_peak_frac"] = r["floor_adam_gflops"] / peak if r.get("floor_adam_gflops") else None

    result = {
        "meta": {
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.throughput"] + list(args.argv)),
            "device": str(device), "device_name": _device_name(device), "threads": threads,
            "cores": _cores(), "quick": args.quick, "repeats": p["repeats"], "torch": torch.__version__,
            "python": platform.python_version(), "peer": "denoising-diffusion-pytorch "
            + str(peer.BENCH_VERSION) if peer else None,
            "peer_ema": getattr(peer.BENCH_EMA, "__module__", None) if peer else None,
            "peer_loader": args.peer_loader, "mallopt": mallopt, "data_dim": DIM, "data_rows": p["rows"],
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "seconds": round(time.perf_counter() - t_start, 1),
        },
        "peak_gflops": peak, "peak_samples": peak_samples,
        "peak_bf16_gflops": peak_bf16, "peak_bf16_samples": peak_bf16_samples,
        "train": train_rows, "sample": sample_rows, "buffer": buffer, "memory": memory,
    }
    result["targets"] = check_targets(result)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def check_targets(res: dict) -> List[dict]:
    """Issue 6 targets (fp32 rows): train >= 1.3x the peer at w256/d4/b256; >= 85% of matmul peak at
    w1024; sampling >= the peer's rows/s at equal sampler steps."""
    out = []
    for r in res["train"]:
        if r.get("peer_loader") == "dataloader" or r.get("gradients") == "autograd" or r.get("precision") == "bf16":
            continue  # context rows
        how = " (ours: torch.compile)" if r.get("compile") else ""
        if (r["width"], r["depth"], r["batch"]) == (256, 4, 256) and r["ratio"] is not None:
            out.append(dict(target=f"train w256/d4/b256{how} >= 1.3x peer", value=r["ratio"],
                            met=r["ratio"] >= 1.3))
        if r["width"] == 1024:
            out.append(dict(target=f"train w1024/d{r['depth']}/b{r['batch']}{how} >= 85% of matmul peak",
                            value=r["ours_peak_frac"], met=r["ours_peak_frac"] >= 0.85))
    for r in res["sample"]:
        if r["ratio"] is not None and r.get("precision") != "bf16":
            name = f"sample w{r['width']}/d{r['depth']} {r['sampler']}-{r['sample_steps']} >= 1.0x peer"
            out.append(dict(target=name, value=r["ratio"], met=r["ratio"] >= 1.0))
    return out


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"`{m['command']}` -- device {m['device']} ({m['device_name']}), torch {m['torch']}, "
             f"{m['threads']} thread(s) of {m['cores']} cores{', glibc mallopt' if m.get('mallopt') else ''}, "
             f"load avg before {m['loadavg_before']} "
             f"after {m['loadavg_after']}, peer {m['peer']} (EMA: {m['peer_ema']}, batches: {m['peer_loader']}), "
             f"median of {m['repeats']} interleaved repeats, matmul peak {res['peak_gflops']:.1f} GFLOP/s"
             + (f" (bf16: {res['peak_bf16_gflops']:.1f})" if res.get("peak_bf16_gflops") else "") + ", "
             f"{m['seconds']} s", "",
             "| what | width/depth | batch or rows | ours | peer | ours/peer | ours/peer (CPU time) "
             "| ours % peak | peer % peak | matmuls alone % peak | matmuls + Adam % peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: _f(None if v is None else v * 100, "{:.0f}%")  # noqa: E731
    for r in res["train"]:
        what = "train steps/s" + (" (peer: DataLoader)" if r.get("peer_loader") == "dataloader" else "") \
            + (" (ours: torch.compile)" if r.get("compile") else "") \
            + (" (ours: autograd)" if r.get("gradients") == "autograd" else "") \
            + (" (both bf16)" if r.get("precision") == "bf16" else "")
        lines.append(f"| {what} | {r['width']}/{r['depth']} | {r['batch']} | {_f(r['ours_rate'])} | "
                     f"{_f(r['peer_rate'])} | {_f(r['ratio'], '{:.2f}x')} | {_f(r['ratio_cpu'], '{:.2f}x')} | "
                     f"{pct(r['ours_peak_frac'])} | {pct(r['peer_peak_frac'])} | {pct(r.get('floor_peak_frac'))} | "
                     f"{pct(r.get('floor_adam_peak_frac'))} |")
    for r in res["sample"]:
        bf = " (both bf16)" if r.get("precision") == "bf16" else ""
        lines.append(f"| samples/s, {r['sampler']} {r['sample_steps']} steps{bf} | {r['width']}/{r['depth']} | "
                     f"{r['rows']} | {_f(r['ours_rate'])} | {_f(r['peer_rate'])} | {_f(r['ratio'], '{:.2f}x')} | "
                     f"{_f(r['ratio_cpu'], '{:.2f}x')} | {pct(r['ours_peak_frac'])} | {pct(r['peer_peak_frac'])} | - | - |")
    b = res["buffer"]
    if b:
        lines += ["", "| replay sample(256) | GenerativeReplayBuffer | SB3 ReplayBuffer | ours/plain |",
                  "| --- | --- | --- | --- |",
                  f"| us per call ({b['num_real']} real, {b['num_synthetic']} synthetic) | {b['ours_us']:.0f} | "
                  f"{b['plain_us']:.0f} | {b['ratio']:.2f}x |"]
    mem = res.get("memory")
    if mem:
        lines += ["", f"| memory, {mem['pool_rows']:,}-row x {mem['dim']} {mem['dtype']} pool (own process, CPU) "
                  "| MiB |", "| --- | --- |",
                  f"| the pool tensor | {mem['pool_mb']:.1f} |",
                  f"| RSS before the retrain (torch, buffer, real rows) | {mem['rss_before_mb']:.0f} |",
                  f"| peak RSS during the retrain (fit, generate, filter, swap) | {mem['peak_during_retrain_mb']:.0f} |",
                  f"| RSS after the retrain | {mem['rss_after_retrain_mb']:.0f} |",
                  f"| peak RSS over {mem['sample_calls']:,} x sample(256) | {mem['peak_during_sampling_mb']:.0f} |"]
    if res["targets"]:
        lines += ["", "| target (issue 6) | value | met |", "| --- | --- | --- |"]
        for t in res["targets"]:
            v = t["value"]
            vs = f"{v * 100:.0f}%" if "peak" in t["target"] else f"{v:.2f}x"
            lines.append(f"| {t['target']} | {vs} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


CSV_FIELDS = ["kind", "width", "depth", "batch", "sampler", "sample_steps", "rows", "unit", "peer_loader", "compile",
              "gradients", "precision", "ours_rate", "peer_rate", "ratio", "ratio_cpu", "ours_peak_frac", "peer_peak_frac", "floor_peak_frac",
              "floor_adam_peak_frac", "ours_us",
              "plain_us", "threads", "device"]


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(res, indent=2))
    with open(out / "throughput.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        extra = {"threads": res["meta"]["threads"], "device": res["meta"]["device"]}
        for r in res["train"] + res["sample"]:
            wr.writerow({**r, **extra})
        if res["buffer"]:
            b = res["buffer"]
            wr.writerow({"kind": "buffer", "batch": b["batch"], "unit": "us/call", "ours_us": b["ours_us"],
                         "plain_us": b["plain_us"], "ratio": b["ratio"], **extra})
    (out / "throughput.md").write_text(markdown(res) + "\n")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny sizes)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--out", default="results/throughput", help="folder for throughput.json/.csv/.md")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3 CPU, 5 CUDA, 1 quick)")
    ap.add_argument("--peer-loader", choices=("index", "dataloader"), default="index",
                    help="peer batches: random indexing (default, least overhead) or the reference's DataLoader")
    ap.add_argument("--mallopt", action="store_true",
                    help="glibc: no mmap / trim for large allocations (whole process, both sides)")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer even if installed")
    ap.add_argument("--no-buffer", action="store_true", help="skip the replay-buffer latency comparison")
    ap.add_argument("--no-autograd", action="store_true",
                    help="skip the context row of our loop on autograd instead of the hand-written gradients")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the extra training rows with SynthERConfig.compile=True")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1M-row pool memory probe")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 rows (SynthERConfig.precision='bf16'; run only where bf16 is native)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    res = run(args)
    write(res, Path(args.out))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
