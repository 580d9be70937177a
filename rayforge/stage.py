"""A resumable Ray stage: a pool of actors works through units the driver hands out; the driver alone records results.

Shared by the shadow models, phase 1 (forge) and phase 2 (rebuild). Each actor is built once from what the driver
put in the object store (the run with its dataset, never a path to read), then receives units: a method name and
arguments, object refs included (checkpoints, θ at a window start), made only when the unit is handed out. At most
`ray.units_in_flight` units wait per actor (backpressure), and units go only to actors that are up, so actors still
waiting for a node (an autoscaler adding GPU nodes) hold no work. `save(key, result)` runs in the driver as each unit
lands, so a stopped stage loses only units in flight. A dead actor is replaced and its units redone; a worker that
raises a RayforgeError (bad input) stops the stage with that one message. With `ray.actors: auto` the pool follows
the cluster's capacity as it grows, up to the work left. The result records where every actor ran (`placement`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from rayforge.config import RayConfig
from rayforge.errors import RayforgeError
from rayforge.progress import progress_bar
from rayforge.ray_utils import actor_options, placement, pool_size, ray_session, unwrap

MAX_REPLACEMENTS_PER_ACTOR = 3
GROW_EVERY_S = 10.0  # how often an "auto" pool looks for new capacity


@dataclass
class Unit:
    """One call to hand out: `worker.<method>(*args)`; `args` may be a function called at hand-out time (so object
    refs exist only while needed). `counts`: part of the stage's work (progress bar, `max_units`); helper calls
    (e.g. stepping the trajectory) do not count. `done(result)`, when given, replaces the stage's `save`."""

    key: Any
    method: str
    args: tuple | Callable[[], tuple] = ()
    counts: bool = True
    done: Callable[[Any], None] | None = None


class UnitQueue:
    """The simplest source of units: all ready, handed out in order."""

    def __init__(self, units: Iterable[Unit]):
        self._queue = collections.deque(units)

    def next_ready(self) -> Unit | None:
        return self._queue.popleft() if self._queue else None

    def requeue(self, unit: Unit) -> None:
        self._queue.appendleft(unit)

    def counted(self) -> int:
        return sum(1 for u in self._queue if u.counts)


class StageWorker:
    """Base of every stage's actor: says where it runs (also the driver's sign that the actor is up)."""

    def placement(self) -> dict:
        return placement()


@dataclass
class StageResult:
    ran: int  # counted units run in this call
    placement: list[dict] = field(default_factory=list)  # per actor: node, gpus, units
    units_in_flight: dict = field(default_factory=dict)  # limit per actor, and the time-averaged number
    startup_s: float | None = None  # from the stage's start until its first actor was up (Ray start-up, imports)
    driver_s: float = 0.0  # time the driver spent handing out and saving units (not waiting for them)


@dataclass
class _Slot:
    actor: Any
    probe: Any  # the placement() call, whose answer says the actor is up
    where: dict | None = None
    units: int = 0
    inflight: list = field(default_factory=list)
    alive: bool = True


class _Stage:
    def __init__(self, ray, source, worker_cls: type, worker_args: tuple, ray_cfg: RayConfig, actors: int | str,
                 save: Callable, desc: str, limit: int, bar, postfix: Callable | None, threads: int | None = None):
        self.ray, self.source, self.save, self.desc, self.limit, self.bar = ray, source, save, desc, limit, bar
        self.postfix, self.auto, self.worker_args = postfix, actors == "auto", worker_args
        self.options = actor_options(ray_cfg, threads)
        self.per_actor = ray_cfg.units_in_flight
        self.actor_cls = ray.remote(worker_cls).options(**self.options, max_restarts=0)
        self.slots: list[_Slot] = []
        self.inflight: dict = {}  # ref -> (unit, slot)
        self.done = self.submitted = self.replacements = 0
        self.start = self.last_event = self.last_grow = time.perf_counter()
        self.busy = self.up = 0.0  # time integrals: units in flight on live actors, live actors
        self.first_up: float | None = None
        self.driver_s = 0.0
        for _ in range(pool_size(actors, self.options, limit)):
            self._add_actor()

    # ---- the pool ---------------------------------------------------------------------------------------------

    def _add_actor(self) -> None:
        actor = self.actor_cls.remote(*self.worker_args)
        self.slots.append(_Slot(actor, actor.placement.remote()))

    def _grow(self) -> None:
        self.last_grow = time.perf_counter()
        alive = sum(1 for s in self.slots if s.alive)
        for _ in range(pool_size("auto", self.options, self.limit - self.done) - alive):
            self._add_actor()

    def _on_probe(self, slot: _Slot) -> None:
        try:
            slot.where = self.ray.get(slot.probe)
            self.first_up = self.first_up or time.perf_counter() - self.start
        except self.ray.exceptions.RayActorError as exc:
            self._lost(slot, exc)
        slot.probe = None

    def _lost(self, slot: _Slot, exc: Exception) -> None:
        """An actor died: a broken worker stops the stage; a lost one is replaced and its units requeued."""
        cause = unwrap(exc)
        if isinstance(cause, RayforgeError):
            raise cause from None
        if getattr(exc, "actor_init_failed", False):  # a broken worker, not a lost one: retrying cannot help
            last = [ln for ln in str(exc).splitlines() if ln.strip()][-1].strip()
            kind, _, message = last.partition(": ")
            if kind.startswith("rayforge.errors."):  # bad input found by the worker's constructor
                raise RayforgeError(f"{self.desc}: {message}") from None
            raise RayforgeError(f"{self.desc}: a worker failed to start: {last}") from None
        self.replacements += 1
        if self.replacements > MAX_REPLACEMENTS_PER_ACTOR * len(self.slots):
            raise RayforgeError(f"{self.desc}: actors keep dying ({self.replacements} replaced); last: "
                                f"{str(exc).splitlines()[0]}") from None
        slot.alive = False
        for ref in reversed(slot.inflight):  # requeue in hand-out order
            unit, _ = self.inflight.pop(ref)
            self.submitted -= unit.counts
            self.source.requeue(unit)
        slot.inflight.clear()
        self._add_actor()

    # ---- units ------------------------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Hand out ready units round-robin to live actors that are up, up to `units_in_flight` each."""
        while True:
            gave = False
            for slot in sorted((s for s in self.slots if s.alive and s.where), key=lambda s: len(s.inflight)):
                if len(slot.inflight) >= self.per_actor:
                    continue
                unit = self.source.next_ready()
                if unit is None:
                    return
                if unit.counts and self.done + self.submitted >= self.limit:
                    self.source.requeue(unit)
                    return
                args = unit.args() if callable(unit.args) else unit.args
                ref = getattr(slot.actor, unit.method).remote(*args)
                self.inflight[ref] = (unit, slot)
                slot.inflight.append(ref)
                self.submitted += unit.counts
                gave = True
            if not gave:
                return

    def _on_result(self, ref) -> None:
        unit, slot = self.inflight[ref]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = unwrap(exc)
            if cause is not exc:
                raise cause from None
            raise
        except self.ray.exceptions.RayActorError as exc:
            self._lost(slot, exc)  # requeues this unit with the actor's others, in order
            return
        del self.inflight[ref]
        slot.inflight.remove(ref)
        self.submitted -= unit.counts
        (unit.done or (lambda r: self.save(unit.key, r)))(result)
        if unit.counts:
            slot.units += 1
            self.done += 1
            self.bar.update(1)
            if self.postfix and hasattr(self.bar, "set_postfix"):
                self.bar.set_postfix(**self.postfix(result, time.perf_counter() - self.start))

    def _account(self) -> None:
        now = time.perf_counter()
        live = [s for s in self.slots if s.alive and s.where]
        self.busy += (now - self.last_event) * sum(len(s.inflight) for s in live)
        self.up += (now - self.last_event) * len(live)
        self.last_event = now

    def run(self) -> StageResult:
        try:
            while self.done < self.limit:
                self._fill()
                probes = {s.probe: s for s in self.slots if s.alive and s.probe is not None}
                waiting = list(self.inflight) + list(probes)
                if not waiting:
                    raise RuntimeError(f"{self.desc}: units left but none can be handed out")
                timeout = max(0.1, GROW_EVERY_S - (time.perf_counter() - self.last_grow)) if self.auto else None
                self.driver_s += time.perf_counter() - self.last_event
                ready, _ = self.ray.wait(waiting, num_returns=1, timeout=timeout)
                self._account()
                if self.auto and time.perf_counter() - self.last_grow >= GROW_EVERY_S:
                    self._grow()
                if not ready:
                    continue
                if ready[0] in probes:
                    self._on_probe(probes[ready[0]])
                else:
                    self._on_result(ready[0])
        finally:
            for slot in self.slots:
                self.ray.kill(slot.actor)
        return StageResult(self.done, [{**s.where, "units": s.units} for s in self.slots if s.where],
                           {"limit": self.per_actor, "mean": self.busy / self.up if self.up else 0.0},
                           self.first_up, self.driver_s)


def run_units(units, worker_cls: type, worker_args: tuple, ray_cfg: RayConfig, actors: int | str,
              save: Callable[[Any, Any], None], desc: str, total: int, progress: bool = True,
              max_units: int | None = None, postfix: Callable[[Any, float], dict] | None = None,
              threads: int | None = None) -> StageResult:
    """Run every unit of `units` (a list of Units, or a source with next_ready/requeue/counted) on a pool of
    `worker_cls(*worker_args)` actors (`actors`: a number or "auto"). `total` counts all units of the stage (done
    ones included) for the progress bar; `max_units` stops after that many (as a Ctrl-C would); `threads`: the torch
    threads each worker computes with (a CPU actor then asks Ray for that many CPUs)."""
    source = UnitQueue(units) if isinstance(units, (list, tuple)) else units
    todo = source.counted()
    limit = todo if max_units is None else min(max_units, todo)
    bar = progress_bar(total=total, desc=desc, unit="unit", disable=not progress)
    bar.update(total - todo)
    try:
        if limit == 0:
            return StageResult(0)
        with ray_session(ray_cfg) as ray:
            return _Stage(ray, source, worker_cls, worker_args, ray_cfg, actors, save, desc, limit, bar,
                          postfix, threads).run()
    finally:
        bar.close()
