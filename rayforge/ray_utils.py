"""Ray at the edge: starting or joining a cluster, and resource options for tasks and actors from the config."""

from __future__ import annotations

import contextlib
import os
import warnings

from rayforge.config import RayConfig


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Join `cfg.address` (or $RAY_ADDRESS, as `ray job submit` sets), else start a local Ray; shut down only
    what we started."""
    import ray

    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def resources(cfg: RayConfig) -> dict:
    """Per-actor/task resources: one GPU each on a GPU cluster, CPUs here. A GPU config on a cluster without GPUs
    falls back to CPU with a warning instead of waiting forever for a GPU that never comes."""
    import ray

    num_gpus = cfg.num_gpus_per_actor
    if num_gpus and not ray.cluster_resources().get("GPU"):
        warnings.warn(f"ray.num_gpus_per_actor={num_gpus} but the Ray cluster has no GPU; running on CPU")
        num_gpus = 0
    return {"num_cpus": cfg.num_cpus_per_actor, "num_gpus": num_gpus}
