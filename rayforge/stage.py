"""A resumable Ray stage: a pool of actors works through units; the driver alone records results.

Shared by phase 1 (forge) and phase 2 (rebuild). Each actor is built once (it loads the log, the data and a model),
at most `inflight_per_actor` units wait per actor, and `save(unit, result)` runs in the driver as each unit
finishes, so a stopped stage loses only units in flight. A dead actor is replaced and its units redone; a worker
that raises a RayforgeError (bad input) stops the stage with that one message.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Iterable

from rayforge.config import RayConfig
from rayforge.errors import RayforgeError
from rayforge.progress import progress_bar
from rayforge.ray_utils import ray_session, resources

MAX_REPLACEMENTS_PER_ACTOR = 3


def run_units(units: Iterable[Any], worker_cls: type, worker_args: tuple, method: str, ray_cfg: RayConfig,
              actors: int, save: Callable[[Any, Any], None], desc: str, total: int, progress: bool = True,
              max_units: int | None = None, postfix: Callable[[Any, float], dict] | None = None,
              inflight_per_actor: int = 2) -> int:
    """Run `worker.<method>(*unit)` for every unit on a pool of `worker_cls(*worker_args)` actors.

    `total` counts all units of the stage (done ones included) for the progress bar; `max_units` stops after that
    many (as a Ctrl-C would). Returns how many units were run."""
    todo = collections.deque(units)
    limit = len(todo) if max_units is None else min(max_units, len(todo))
    bar = progress_bar(total=total, desc=desc, unit="unit", disable=not progress)
    bar.update(total - len(todo))
    done, start = 0, time.perf_counter()
    if not todo or limit == 0:
        bar.close()
        return 0
    with ray_session(ray_cfg) as ray:
        actor_cls = ray.remote(worker_cls).options(**resources(ray_cfg), max_restarts=0)
        pool = [actor_cls.remote(*worker_args) for _ in range(min(actors, limit))]
        inflight: dict = {}
        replacements = 0

        def submit(slot: int) -> None:
            while todo and done + len(inflight) < limit and \
                    sum(1 for _, s in inflight.values() if s == slot) < inflight_per_actor:
                unit = todo.popleft()
                inflight[getattr(pool[slot], method).remote(*unit)] = (unit, slot)

        for slot in range(len(pool)):
            submit(slot)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            unit, slot = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, RayforgeError):  # bad input found by a worker: one clear line
                    raise exc.cause from None
                raise
            except ray.exceptions.RayActorError as exc:
                if getattr(exc, "actor_init_failed", False):  # a broken worker, not a lost one: retrying cannot help
                    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                    raise RayforgeError(f"{desc}: a worker failed to start: {lines[-1].strip()}") from None
                # The actor died: requeue its units (its other in-flight one fails the same way) and replace it.
                replacements += 1
                if replacements > MAX_REPLACEMENTS_PER_ACTOR * len(pool):
                    raise RayforgeError(f"{desc}: actors keep dying ({replacements} replaced); last: "
                                        f"{str(exc).splitlines()[0]}") from None
                todo.appendleft(unit)
                for r in [r for r, (_, s) in inflight.items() if s == slot]:
                    todo.appendleft(inflight.pop(r)[0])
                pool[slot] = actor_cls.remote(*worker_args)
                submit(slot)
                continue
            save(unit, result)
            done += 1
            bar.update(1)
            if postfix and hasattr(bar, "set_postfix"):
                bar.set_postfix(**postfix(result, time.perf_counter() - start))
            submit(slot)
    bar.close()
    return done
