"""Ray at the edge: the session, what actors and tasks request, where a worker computes, and where work ran.

Session: a private local Ray unless `ray.address` or $RAY_ADDRESS (as `ray job submit` sets) names a cluster. A bare
`ray.init()` would attach to whatever cluster Ray's bootstrap file names, a dead head included (then it retries
forever); a named cluster is probed first and refused within seconds when it does not answer.

Resources: a stage asks for `ray.num_gpus_per_actor` GPUs per actor whenever it is set, so an autoscaler sees the
demand and adds GPU nodes even when none is up yet. Only a private local Ray on a machine without GPUs falls back to
CPU (one warning line). Inside a worker, the device is what Ray assigned: CUDA when it was given a GPU that torch can
use (Ray's CUDA_VISIBLE_DEVICES makes it cuda:0), else CPU (logical GPUs on a CPU machine compute on CPU).

Run paths: only the driver reads and writes the run directory. Inside a Ray job the working directory is Ray's
unpacked copy of the sources, so a relative path is resolved against $RAYFORGE_SUBMIT_DIR (the directory the job
was submitted from, passed in the job's runtime_env) or refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rayforge.config import RayConfig
from rayforge.errors import RayforgeError

PROBE_TIMEOUT_S = 5.0
SUBMIT_DIR_ENV = "RAYFORGE_SUBMIT_DIR"
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in every job's driver
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One warning line on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"rayforge: warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the session

def named_address(cfg: RayConfig) -> str | None:
    """The cluster the user named (config, else $RAY_ADDRESS), or None for a private local Ray."""
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def _gcs_endpoint(address: str) -> str:
    """host:port to probe for `address` (ip:port, ray://host:port, or "auto" = Ray's bootstrap file)."""
    if address.startswith("ray://"):
        return address[len("ray://"):].rstrip("/")
    from ray._private.services import canonicalize_bootstrap_address

    try:
        endpoint = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise RayforgeError(f"ray: cannot use the Ray address '{address}': {str(exc).splitlines()[0]}") from None
    if endpoint is None:
        raise RayforgeError(f"ray: no Ray cluster found for address '{address}'")
    return endpoint


def check_reachable(address: str, timeout: float | None = None) -> None:
    """Refuse, within `timeout` seconds (PROBE_TIMEOUT_S), a cluster whose GCS (or Ray Client server) does not
    answer gRPC."""
    import grpc

    timeout = timeout or PROBE_TIMEOUT_S
    endpoint = _gcs_endpoint(address)
    channel = grpc.insecure_channel(endpoint)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise RayforgeError(f"ray: the Ray cluster at {address} ({endpoint}) does not answer within {timeout:g} s; "
                            f"start it, fix ray.address / $RAY_ADDRESS, or unset them to run on a private local "
                            f"Ray") from None
    finally:
        channel.close()


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Use the Ray this process already joined, else join the named cluster (probed first), else start a private
    local instance; shut down only what we started."""
    import ray

    started = False
    if not ray.is_initialized():
        address = named_address(cfg)
        kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        if address:
            check_reachable(address)
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", **kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- resources

def actor_options(cfg: RayConfig, threads: int | None = None) -> dict:
    """num_cpus / num_gpus for every actor and task of a stage (inside a session). A CPU worker that computes with
    `threads` torch threads (the log's count, which an exact replay needs) asks Ray for that many CPUs, so Ray
    never packs more threads than cores on a node (oversubscribed, two 2-thread actors on 2 cores ran phase 1 ~7x
    slower per step than one thread alone); a GPU worker computes on its GPU and keeps `ray.num_cpus_per_actor`."""
    import ray

    gpus = cfg.num_gpus_per_actor
    if gpus and not named_address(cfg) and not ray.cluster_resources().get("GPU"):
        warn_once(f"ray.num_gpus_per_actor={gpus:g} but this local Ray has no GPU: running on CPU")
        gpus = 0
    cpus = cfg.num_cpus_per_actor if gpus or not threads else max(cfg.num_cpus_per_actor, threads)
    if cpus > cfg.num_cpus_per_actor and not named_address(cfg):
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if largest < cpus:
            raise RayforgeError(f"the log was trained with {threads} torch threads and an exact replay needs them, "
                                f"but this Ray's largest node has {largest:g} CPUs; run on a node with {threads} "
                                f"CPUs or retrain with train.threads={int(largest) or 1}")
    return {"num_cpus": cpus, "num_gpus": gpus}


def capacity(options: dict) -> int:
    """How many actors with `options` the cluster holds now: its GPUs when GPUs are asked for, else its CPUs."""
    import ray

    total = ray.cluster_resources()
    if options["num_gpus"]:
        return int(total.get("GPU", 0) // options["num_gpus"])
    if options["num_cpus"]:
        return int(total.get("CPU", 0) // options["num_cpus"])
    return sys.maxsize


def pool_size(actors: int | str, options: dict, work: int) -> int:
    """Actors for a stage with `work` units: the number asked for, or ("auto") the cluster's capacity; never more
    than the work, never fewer than one (a pending actor is what makes an autoscaler add a node)."""
    wanted = capacity(options) if actors == "auto" else int(actors)
    return max(1, min(wanted, work))


# ---------------------------------------------------------------------------------------------- inside a worker

def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # ray missing or not started: a plain process
        return False


def worker_device(train_device: str):
    """The torch device to compute on. In a Ray worker: CUDA when Ray assigned GPUs and torch can use them (Ray's
    CUDA_VISIBLE_DEVICES then shows them from cuda:0), CPU otherwise, also for logical GPUs on a machine without
    CUDA. Outside Ray: `train.device` (auto = CUDA when available)."""
    import torch

    if train_device != "cpu" and in_ray_worker():
        import ray

        if ray.get_gpu_ids() and torch.cuda.is_available():
            return torch.device("cuda")
        if train_device == "cuda":
            raise RayforgeError("train.device is 'cuda' but Ray gave this worker no usable GPU "
                                "(set ray.num_gpus_per_actor, or train.device: auto)")
        return torch.device("cpu")
    from rayforge.train.run import resolve_device

    return resolve_device(train_device)


def placement() -> dict:
    """Where the calling worker runs: its node id and the GPU ids Ray assigned it."""
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def unwrap(exc: Exception) -> Exception:
    """A RayforgeError raised in a worker (bad input), as the driver should raise it: one line; else `exc`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RayforgeError) else exc


# ---------------------------------------------------------------------------------------------- run paths

def in_ray_job() -> bool:
    return _JOB_ENV in os.environ


def resolve_run_path(path: str | Path) -> Path:
    """An absolute run path: as given when absolute; else against $RAYFORGE_SUBMIT_DIR, else the working directory
    outside a Ray job; refused inside a job (Ray's unpacked working directory is temporary)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = os.environ.get(SUBMIT_DIR_ENV)
    if base:
        if not Path(base).is_absolute():
            raise RayforgeError(f"${SUBMIT_DIR_ENV}='{base}' must be an absolute path")
        return Path(base) / p
    if in_ray_job():
        raise RayforgeError(f"'{path}' is a relative path inside a Ray job, where it would land in Ray's temporary "
                            f"working directory: give an absolute path, or pass {SUBMIT_DIR_ENV}=$PWD in the job's "
                            f"runtime_env")
    return Path.cwd() / p
