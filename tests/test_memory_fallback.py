"""Memory fallbacks under a real allocation failure (RLIMIT_AS in a child process, tests/memory_limit_run.py):
sampling halves its batch and starts over, a fit that runs out keeps the previous model, any other
RuntimeError passes through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("memory_limit_run.py")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")


@pytest.fixture(scope="module")
def limited() -> dict:
    """One run of the runner: 100K rows requested in one batch, 64 MiB of address space to spare."""
    r = subprocess.run([sys.executable, str(RUNNER), "--rows", "100000", "--headroom-mib", "64",
                        "--sampler", "stochastic", "--steps", "4"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpu_sampling_falls_back_on_a_real_allocation_failure(limited):
    # the failures were the CPU allocator's, not an injected exception
    assert "DefaultCPUAllocator: can't allocate memory" in limited["sample_logs"], limited["sample_logs"]
    fallbacks = limited["fallbacks"]
    assert fallbacks and fallbacks[0] == 50_000                       # halved from the requested 100K ...
    assert all(b == a // 2 for a, b in zip(fallbacks, fallbacks[1:]))  # ... and again while it failed
    assert limited["shape"] == [100_000, 8] and limited["finite"]
    # starting over with the same seed: exactly the rows a call with the final batch size draws
    # (stochastic sampler, so the churn noise is the same too) ...
    assert limited["equal_to_final_batch_size"]
    # ... which matters: the rows depend on the batch size (noise is drawn batch by batch)
    assert not limited["equal_to_half_of_it"]


def test_cpu_fit_out_of_memory_keeps_the_previous_model(limited):
    assert limited["fit_error"] is not None and "out of memory while fitting" in limited["fit_error"]
    assert "DefaultCPUAllocator" in limited["fit_error"]
    assert limited["model_kept"]                                      # same samples as before the failed fit


def test_other_runtime_errors_are_not_taken_for_memory_failures(limited):
    assert limited["other_error"] == "unrelated failure" and not limited["other_retried"]


def test_memory_failure_classification():
    from torch import OutOfMemoryError

    from synther_buffer.diffusion import is_out_of_memory

    linux = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 314572800 bytes. Error code 12 (Cannot allocate memory)")
    windows = RuntimeError("[enforce fail at ..\\c10\\core\\impl\\alloc_cpu.cpp:81] data. DefaultCPUAllocator: "
                           "not enough memory: you tried to allocate 314572800 bytes.")
    assert is_out_of_memory(linux) and is_out_of_memory(windows)
    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory")) and is_out_of_memory(MemoryError())
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), RuntimeError("out of memory"),
                  ValueError("DefaultCPUAllocator: can't allocate memory"), KeyError("x")):
        assert not is_out_of_memory(other), other
