"""Ray pieces: sharded upsampling and remote retraining (the ``distributed`` extra).

Ray does all the distribution: scheduling by resources, moving arrays through its object store,
rerunning a task whose worker died. Nothing here opens a socket, a queue or a process pool of its
own. Ray is imported only when one of these is used, through ``extras.require``, so a missing Ray
names the extra to install.

* :class:`ShardedGeneration` -- ``upsample(..., workers=N)`` / ``synther upsample --workers N``: the
  model fitted in the driver goes to the object store once (its state dict); N Ray tasks
  (:func:`generate_shard`) each draw a contiguous range of the output's chunks and stream their
  synthetic rows to a part file (``shard-XXXX.npy``, written as ``.tmp`` and renamed when
  complete) in a temporary directory beside the output; the driver merges the parts, with the
  real rows of a mixture, into the output format chunk by chunk (``offline.upsample``). A chunk's
  rows depend only on (seed, chunk index), never on which task draws them, so N = 1, 2, ...
  write the same file. A task whose worker process or node dies is rerun by Ray
  (``max_retries``) from the start of its range; an exception in a task is not retried (it would
  fail the same way) and fails the upsample, which then removes its part files and writes nothing.
* :class:`RemoteRetrainer` -- ``SynthERConfig.retrain_backend="ray"``: ``SyntheticPool.retrain``'s
  work (``pool.build_pool``) runs in a Ray actor placed by resources (default: 1 CPU, plus 1 GPU
  when the cluster has GPUs). The real rows go to the object store on the caller's thread; the
  fitted model (state dict) and the new pool come back the same way. An actor that dies is a
  counted, failed retrain; the next retrain starts a new actor.

Which cluster: ``upsample`` takes an address (None: a new local Ray instance, shut down at the
end). The retrain actor uses the cluster this process is connected to; when Ray is not initialised
yet, the first remote retrain calls ``ray.init()``, which joins the cluster named by
``RAY_ADDRESS`` or one started on this machine with ``ray start``, else starts a local instance.
Workers import ``synther_buffer`` as installed on their node; from a source checkout, the
checkout's directory is put on the workers' ``PYTHONPATH`` (the same path must hold it on every
node).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .diffusion import TransitionDiffusion
from .extras import require
from .layout import RowLayout

log = logging.getLogger(__name__)

__all__ = ["ShardedGeneration", "RemoteRetrainer", "RetrainActor", "generate_shard", "check_shared_dir",
           "connect", "worker_runtime_env", "require_ray"]


def require_ray(purpose: str):
    """``import ray``, or ``MissingExtraError`` naming the ``distributed`` extra.

    Args:
        purpose: what needs Ray, for the message.

    Returns:
        The ``ray`` module.
    """
    return require("ray", "distributed", purpose)


def connect(address: Optional[str]) -> bool:
    """Join the Ray cluster at ``address``, or start a local instance when ``address`` is None.

    A no-op when Ray is already initialised in this process (its cluster is used).

    Args:
        address: ``"auto"``, ``"host:port"``, ``"ray://host:port"``, or None for a new local
            instance (``ray.init(address="local")``, which ignores ``RAY_ADDRESS``).

    Returns:
        True when this call initialised Ray (the caller then shuts it down when done).
    """
    ray = require_ray("connecting to Ray")
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def worker_runtime_env() -> Optional[dict]:
    """The runtime env that lets Ray workers import this ``synther_buffer``.

    Returns:
        None for an installed package (workers import theirs); for a source checkout, env vars
        that put the checkout's directory first on the workers' ``PYTHONPATH``.
    """
    root = Path(__file__).resolve().parent.parent
    if root.name in ("site-packages", "dist-packages"):
        return None
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path}}


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when it has none)."""
    ray = require_ray("Ray resources")
    return float(ray.cluster_resources().get("GPU", 0.0))


def use_assigned_cpus() -> int:
    """In a Ray task or actor: run torch on as many threads as CPUs Ray assigned it (at least 1).

    Returns:
        The thread count set.
    """
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


def _node_sees(path: str) -> Tuple[str, bool]:
    """``(host name, whether path exists)``, run on one Ray node."""
    return socket.gethostname(), os.path.exists(path)


def check_shared_dir(directory: Path, timeout_s: float = 300.0,
                     probe: Optional[Callable[[str], Tuple[str, bool]]] = None,
                     why: str = "the generation tasks write their parts beside the output") -> None:
    """Make sure every alive Ray node sees ``directory`` (the shards write their parts there).

    Writes a probe file into ``directory``, runs ``probe`` on every alive node (pinned to it) and
    removes the file again.

    Args:
        directory: an existing directory.
        timeout_s: how long to wait for the nodes' answers (each answer needs a worker started on
            its node, which takes long on a busy machine).
        probe: ``probe(path) -> (host, exists)``, run on each node (default: this module's
            ``_node_sees``, looked up at call time).
        why: what is written there, for the error message.

    Raises:
        ValueError: some node does not see the file (named in the message).
        TimeoutError: some node did not answer within ``timeout_s`` (named in the message).
    """
    ray = require_ray("checking a shared directory")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = Path(directory) / f".synther-probe-{os.getpid()}-{time.time_ns()}"
    token.write_text("shared?")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        remote = ray.remote(num_cpus=0)(probe if probe is not None else _node_sees)
        refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                               runtime_env=worker_runtime_env()).remote(str(token)) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        late = [n for n, r in zip(nodes, refs) if r not in ready]
        if late:   # left to finish (no CPU held): ray.cancel can abort this process (see ShardedGeneration.abort)
            raise TimeoutError(f"{len(late)} of {len(nodes)} Ray nodes did not answer the check that they see "
                               f"{directory} within {timeout_s:g} s (no worker started there): "
                               + ", ".join(n["NodeManagerAddress"] for n in late))
        answers = ray.get(refs)
    finally:
        token.unlink(missing_ok=True)
    blind = [f"{host} ({n['NodeManagerAddress']})" for n, (host, ok) in zip(nodes, answers) if not ok]
    if blind:
        raise ValueError(f"{directory} is not visible on {len(blind)} of {len(nodes)} Ray nodes: {', '.join(blind)}; "
                         f"{why}: put it on a filesystem every node mounts (NFS, a shared volume)")


# ---------------------------------------------------------------------------------------------- upsample
# ShardedGeneration.abort writes this file into the parts directory; a shard stops before its next chunk.
ABORT_FILE = "ABORT"


class ShardAborted(RuntimeError):
    """A generation task stopped because its upsample was aborted (``ABORT_FILE`` appeared)."""


def generate_shard(state: dict, shard: int, plan: Sequence[Tuple[int, int]], spec, parts_dir: str,
                   use_gpu: bool) -> Dict[str, Any]:
    """The body of one generation task: draw the synthetic rows of ``plan``'s chunks into a part file.

    Rebuilds the model from ``state``, then for each ``(chunk, n)`` of ``plan`` draws ``n`` rows
    with ``spec.generate`` (the seed is the chunk's) and appends them to
    ``parts_dir/shard-XXXX.npy.tmp``, renamed to ``shard-XXXX.npy`` once complete. A rerun (Ray's
    retry after the worker died) starts the file over. ``shard-XXXX.json`` beside it records the
    attempt, host and pid as the attempt starts. Before each chunk it looks for ``parts_dir/ABORT``
    (``ShardedGeneration.abort``) and stops there: the cooperative cancel of an aborted upsample.

    Args:
        state: ``TransitionDiffusion.state_dict()`` with CPU tensors (from the object store).
        shard: this task's index.
        plan: ``(output chunk index, synthetic rows)`` pairs, in output order.
        spec: the ``offline.SyntheticSpec`` (seed, action columns, clip bounds).
        parts_dir: the directory of the part files (seen by every node).
        use_gpu: sample on CUDA (the task holds a GPU) rather than the CPU.

    Returns:
        The shard's record: ``shard``, ``chunks`` (first, last + 1), ``rows``, ``attempt``, ``host``,
        ``pid``, ``node_id`` (Ray's), ``device``, ``threads``, ``seconds`` (the task), ``load_seconds`` (model rebuild),
        ``sample_seconds``, ``outside_real``, ``clipped``.

    Raises:
        FileNotFoundError: ``parts_dir`` does not exist on this node.
        ShardAborted: the upsample was aborted (its partial part file removed).
    """
    from .offline import _NpyStream

    t0 = time.perf_counter()
    parts = Path(parts_dir)
    if not parts.is_dir():
        raise FileNotFoundError(f"{parts} is not visible on node {socket.gethostname()}: the output must be on a "
                                f"filesystem every Ray node mounts")
    name = f"shard-{shard:04d}"
    info_path = parts / f"{name}.json"
    attempt = 1
    if info_path.is_file():
        try:
            attempt = int(json.loads(info_path.read_text())["attempt"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            attempt = 2
    import ray

    info = {"shard": shard, "attempt": attempt, "host": socket.gethostname(), "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id()}
    tmp_info = info_path.with_name(info_path.name + ".tmp")
    tmp_info.write_text(json.dumps(info))
    os.replace(tmp_info, info_path)

    threads = use_assigned_cpus()
    device = "cuda" if use_gpu else "cpu"
    model = TransitionDiffusion.from_state_dict(state, device=device)
    load_seconds = time.perf_counter() - t0
    total = int(sum(n for _, n in plan))
    part = parts / f"{name}.npy"
    tmp = parts / f"{name}.npy.tmp"
    stream = _NpyStream(tmp, (total, model.dim), np.dtype(np.float32))
    outside = clipped = 0
    sample_seconds = 0.0
    try:
        for chunk, n in plan:
            if (parts / ABORT_FILE).exists():
                raise ShardAborted(f"shard {shard} stopped before chunk {chunk}: the upsample was aborted")
            if n:
                t1 = time.perf_counter()
                rows, o, c = spec.generate(model, chunk, n)
                sample_seconds += time.perf_counter() - t1
                outside += o
                clipped += c
                stream.write(stream.rows, rows)
        stream.close()
    except BaseException:
        stream.f.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, part)
    return {**info, "chunks": [plan[0][0], plan[-1][0] + 1] if plan else [0, 0], "rows": total,
            "device": device, "threads": threads, "seconds": time.perf_counter() - t0,
            "load_seconds": load_seconds, "sample_seconds": sample_seconds, "outside_real": outside,
            "clipped": clipped}


class ShardedGeneration:
    """The synthetic rows of an upsample, drawn by Ray tasks and read back chunk by chunk for the merge.

    Built before the fit (so a missing Ray, an unreachable cluster or a directory some node does not
    see fails first); ``start`` launches the tasks once the model is fitted; ``take`` hands the
    merge loop each chunk's rows from the part files, in output order, waiting for a task only
    when its rows are needed (the merge of early shards overlaps the generation of later ones).

    Args:
        workers: the number of generation tasks (at most one per output chunk are used).
        address: the Ray cluster (see :func:`connect`).
        cpus_per_worker: CPUs each task reserves.
        max_retries: reruns of a task whose worker or node died.
        device: the model config's device: ``"cpu"`` never asks for GPUs; anything else asks for
            one GPU per task when the cluster has GPUs.
        shared_dir: where the part files go (the output's directory); every node must see it.

    Raises:
        MissingExtraError: Ray is not installed.
        ValueError: a ``cuda`` device on a cluster without GPUs, or ``shared_dir`` not seen by
            every node.
    """

    def __init__(self, workers: int, *, address: Optional[str] = None, cpus_per_worker: float = 1.0,
                 max_retries: int = 3, device: str = "auto", shared_dir: Path = Path(".")):
        self.ray = require_ray("upsample with workers (synther upsample --workers)")
        self.workers, self.address = int(workers), address
        self.cpus_per_worker, self.max_retries = float(cpus_per_worker), int(max_retries)
        self.started = connect(address)
        try:
            gpus = cluster_gpus()
            self.use_gpus = gpus > 0 and device != "cpu"
            if str(device).startswith("cuda") and gpus == 0:
                raise ValueError(f"device {device!r}, but the Ray cluster has no GPUs")
            self.nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
            if self.nodes > 1 or not self.started:   # a remote cluster, even of one node, may not see it
                check_shared_dir(Path(shared_dir))
        except BaseException:
            self.shutdown()
            raise
        self.parts_dir: Optional[Path] = None
        self.refs: List[Any] = []
        self.results: List[Optional[dict]] = []
        self.owner: List[int] = []       # output chunk -> shard
        self.offset: List[int] = []      # shard -> rows of its part already merged
        self.open: Dict[int, np.ndarray] = {}
        self.bar = None
        self.outside_real = self.clipped = 0
        self.sample_seconds = 0.0

    def start(self, model: TransitionDiffusion, spec, plan: Sequence[Tuple[int, int, int]], out: Path,
              bar=None) -> "ShardedGeneration":
        """Launch the generation tasks for ``plan`` (``offline.chunk_plan``) and return self.

        Args:
            model: the fitted model (sent once through the object store as a CPU state dict).
            spec: the ``offline.SyntheticSpec``.
            plan: ``(start, end, real rows)`` per output chunk.
            out: the output path; the part files go in a temporary directory beside it.
            bar: a tqdm bar to print the shards' completion lines through (optional).

        Returns:
            self, the merge loop's source of synthetic rows.
        """
        from .pool import _to_cpu

        ray = self.ray
        self.bar = bar
        n_chunks = len(plan)
        shards = max(1, min(self.workers, n_chunks))
        bounds = [i * n_chunks // shards for i in range(shards + 1)]
        self.parts_dir = Path(tempfile.mkdtemp(prefix=".synther-parts-", dir=out.parent))
        state_ref = ray.put(_to_cpu(model.state_dict()))
        task = ray.remote(generate_shard).options(
            num_cpus=self.cpus_per_worker, num_gpus=1 if self.use_gpus else 0, max_retries=self.max_retries,
            retry_exceptions=False, scheduling_strategy="SPREAD", runtime_env=worker_runtime_env())
        self.owner = [0] * n_chunks
        self.results = [None] * shards
        self.offset = [0] * shards
        for i in range(shards):
            shard_plan = []
            for c in range(bounds[i], bounds[i + 1]):
                start, end, r = plan[c]
                shard_plan.append((c, end - start - r))
                self.owner[c] = i
            self.refs.append(task.remote(state_ref, i, shard_plan, spec, str(self.parts_dir), self.use_gpus))
        return self

    def _wait_for(self, shard: int) -> None:
        """Block until ``shard`` is done, collecting (and failing fast on) any task that finishes first."""
        ray = self.ray
        while self.results[shard] is None:
            pending = [r for i, r in enumerate(self.refs) if self.results[i] is None]
            ready, _ = ray.wait(pending, num_returns=1)
            i = self.refs.index(ready[0])
            res = ray.get(ready[0])   # raises when the task failed for good
            self.results[i] = res
            self.sample_seconds += res["sample_seconds"]
            self.outside_real += res["outside_real"]
            self.clipped += res["clipped"]
            msg = (f"shard {i + 1}/{len(self.refs)}: {res['rows']:,} rows in {res['seconds']:.1f}s on "
                   f"{res['host']} ({res['device']}, attempt {res['attempt']})")
            log.info(msg)
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg)

    def take(self, chunk: int, n: int) -> np.ndarray:
        """The ``n`` synthetic rows of output chunk ``chunk`` (chunks are taken in order)."""
        i = self.owner[chunk]
        self._wait_for(i)
        if i not in self.open:
            self.open = {i: np.load(self.parts_dir / f"shard-{i:04d}.npy", mmap_mode="r")}  # one part open
        o = self.offset[i]
        rows = np.array(self.open[i][o:o + n])
        if len(rows) != n:
            raise RuntimeError(f"shard {i}'s part has {o + len(rows)} rows, the merge expected at least {o + n}")
        self.offset[i] = o + n
        return rows

    def close(self) -> None:
        """After the merge: check every part was used up exactly, then remove the part files."""
        for i in range(len(self.refs)):
            self._wait_for(i)
            if self.offset[i] != self.results[i]["rows"]:
                raise RuntimeError(f"shard {i} drew {self.results[i]['rows']} rows, the merge used {self.offset[i]}")
        self._remove_parts()

    def abort(self, settle_s: float = 60.0) -> None:
        """On failure or Ctrl-C: tell the shards still running to stop, let them settle (up to
        ``settle_s``), and remove the part files whatever happens meanwhile (a second Ctrl-C included).

        The stop is cooperative: ``ABORT_FILE`` in the parts directory, which each shard checks before its
        next chunk. Not ``ray.cancel``: cancelling a task whose reply is in flight (forced or not) trips
        an internal check in Ray 2.60 that aborts the driver process ("Tried to complete task that was not
        pending"; seen here in the tests). Waiting means no shard writes into the parts directory after
        it is removed.
        """
        try:
            pending = [ref for i, ref in enumerate(self.refs) if self.results[i] is None]
            if pending and self.parts_dir is not None:
                (self.parts_dir / ABORT_FILE).touch()
                self.ray.wait(pending, num_returns=len(pending), timeout=settle_s)  # failures are not raised here
        finally:
            self._remove_parts()

    def _remove_parts(self) -> None:
        self.open = {}
        if self.parts_dir is not None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.parts_dir = None

    def summary(self) -> dict:
        """``shards`` (each task's record) and ``ray`` (nodes, resources per task) for the upsample summary."""
        return {"shards": [dict(r) for r in self.results if r is not None],
                "ray": {"address": self.address, "nodes": self.nodes, "cpus_per_worker": self.cpus_per_worker,
                        "gpus_per_worker": 1 if self.use_gpus else 0, "max_retries": self.max_retries,
                        "local_instance": self.started}}

    def shutdown(self) -> None:
        """Shut Ray down if this object started it."""
        if self.started:
            self.ray.shutdown()
            self.started = False


# ---------------------------------------------------------------------------------------------- retraining
class RetrainActor:
    """The Ray actor of ``retrain_backend="ray"``: runs ``pool.build_pool`` where Ray placed it."""

    def build(self, config, rows: np.ndarray, retrain_index: int, env_step: int, layout: RowLayout,
              action_low: Optional[np.ndarray], action_high: Optional[np.ndarray],
              previous: Optional[dict] = None) -> dict:
        """One retrain: ``pool.build_pool`` with the model returned as a CPU state dict.

        ``previous`` (the installed model's CPU state dict, for ``config.warm_start``) is what a warm
        fit continues from.

        Returns:
            ``build_pool``'s dict with ``"model"`` replaced by ``"model_state"``, plus ``"host"``,
            ``"pid"``, ``"threads"`` and ``"device"`` (where the work ran).
        """
        from .pool import _to_cpu, build_pool

        threads = use_assigned_cpus()
        out = build_pool(config, rows, retrain_index, env_step, layout, action_low, action_high, previous=previous)
        out.update(host=socket.gethostname(), pid=os.getpid(), threads=threads)
        if out["error"] is None:
            model = out.pop("model")
            out["device"] = str(model.device)
            out["model_state"] = _to_cpu(model.state_dict())
        return out

    def where(self) -> dict:
        """``{"pid", "host", "node_id"}`` of the actor's process (diagnostics, tests)."""
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}


class RemoteRetrainer:
    """The actor handle and its options behind ``SyntheticPool(retrain_backend="ray")``.

    The actor is created at the first retrain (initialising Ray if needed, see the module
    docstring) and kept for the next ones; one that died is dropped and a new one started at the
    next retrain.

    Raises:
        MissingExtraError: Ray is not installed (at construction, i.e. when the pool is built).
    """

    def __init__(self):
        self.ray = require_ray("SynthERConfig.retrain_backend='ray'")
        self.options: Optional[dict] = None
        self.actor = None
        self._actor_options: Optional[dict] = None
        self.actors_started = 0
        self.actors_lost = 0

    def set_options(self, options: dict) -> None:
        """Use these Ray actor options from the next retrain on (see ``SyntheticPool.set_ray_actor_options``)."""
        self.options = dict(options)

    def _resolved_options(self, config) -> dict:
        if self.options is not None:
            return dict(self.options)
        opts = {"num_cpus": 1}
        if config.device != "cpu" and cluster_gpus() > 0:
            opts["num_gpus"] = 1
        return opts

    def _get_actor(self, config):
        ray = self.ray
        if not ray.is_initialized():
            log.info("retrain_backend='ray': initialising Ray (RAY_ADDRESS, a local `ray start` cluster or a new "
                     "local instance)")
            ray.init()
        opts = self._resolved_options(config)
        if self.actor is not None and opts != self._actor_options:
            self.discard(self.actor, lost=False)
        if self.actor is None:
            cls = ray.remote(RetrainActor)
            self.actor = cls.options(max_restarts=0, runtime_env=worker_runtime_env(), **opts).remote()
            self._actor_options = opts
            self.actors_started += 1
        return self.actor

    def discard(self, actor, lost: bool = True) -> None:
        """Forget ``actor`` (dead, or started with other options); the next retrain starts a new one."""
        if lost:
            self.actors_lost += 1
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
        if self.actor is actor:
            self.actor = None

    def submit(self, config, rows: np.ndarray, retrain_index: int, env_step: int, layout: RowLayout,
               action_low: Optional[np.ndarray], action_high: Optional[np.ndarray],
               device: torch.device, previous: Optional[dict] = None) -> "RemoteCall":
        """Put ``rows`` in the object store and start the retrain on the actor (returns at once).

        Args:
            config: the pool's config.
            rows: the real rows (copied into the object store here).
            retrain_index, env_step, layout, action_low, action_high: as ``pool.build_pool``.
            device: where the caller wants the returned model and pool.
            previous: the installed model's CPU state dict, which a warm retrain
                (``config.warm_start``) continues from; it goes to the object store here too.

        Returns:
            A :class:`RemoteCall`; its ``result()`` blocks for the retrain's outcome.
        """
        ray = self.ray
        actor = self._get_actor(config)
        rows_ref = ray.put(np.ascontiguousarray(rows))
        prev_ref = None if previous is None else ray.put(previous)
        ref = actor.build.remote(config, rows_ref, retrain_index, env_step, layout, action_low, action_high,
                                 previous=prev_ref)
        return RemoteCall(self, actor, ref, env_step, device)


class RemoteCall:
    """One remote retrain in flight; ``result()`` turns it into what ``SyntheticPool._install`` takes."""

    def __init__(self, owner: RemoteRetrainer, actor, ref, env_step: int, device: torch.device):
        self.owner, self.actor, self.ref, self.env_step, self.device = owner, actor, ref, env_step, device
        self.seconds: Optional[float] = None
        self._t0 = time.perf_counter()

    def result(self) -> dict:
        """Block until the actor answers.

        Returns:
            ``pool.build_pool``'s dict with the model rebuilt on ``device`` and the pool copied out
            of the object store; or ``{"error": <Ray error>, "env_step"}`` when the actor died (the
            actor is discarded: the next retrain starts a new one).

        Raises:
            ray.exceptions.RayTaskError: the build raised something other than a diverging fit (a
                bug, out of memory): the background thread hands it to ``poll()``, as for the thread
                backend.
        """
        ray = self.owner.ray
        from ray.exceptions import RayError, RayTaskError

        try:
            out = ray.get(self.ref)
        except RayTaskError:
            raise
        except RayError as e:   # the actor or its node died: a failed retrain, not a crash of the caller
            self.owner.discard(self.actor)
            log.warning("SynthER retrain actor lost (%s: %s); a new actor will run the next retrain",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return {"error": e, "env_step": self.env_step}
        finally:
            self.seconds = time.perf_counter() - self._t0
        if out["error"] is None:
            out["model"] = TransitionDiffusion.from_state_dict(out.pop("model_state"), device=str(self.device))
            out["pool"] = np.array(out["pool"], copy=True)   # own it, release the object store's copy
        out["remote_seconds"] = self.seconds
        return out
