"""Export the Proof-of-Repudiation of one training point: its group's forged log, replayed into a complete PoL.

The PoR of point x* (Sections II-III of the paper) is a valid PoL of a model θ' close to the deployed θ* on
D' = D \\ X̂, where X̂ is x*'s group (Key Idea 2: one PoR serves all λ members). The forged log comes from phase 1
(`rayforge.rebuild.forged_log`); here it is replayed sequentially through `rayforge.train.sgd`, exactly as
`rayforge.rebuild.engine.rebuild_group` and `rayforge verify` do, and its checkpoints are written at every step the
original log has one. Before the group's first appearance the two trajectories are the same, so those checkpoints
are copied from the original log.

Beyond the paper, for a cheap top-Q verification: while replaying, the export measures every step's update
‖θ_{t+1} − θ_t‖₂ (parameters only, the verifier's `l2_distance`) and, per epoch, adds the checkpoints t and t+1 around
the `topq_windows` largest single-step updates. They are ordinary checkpoints of por.json (`--steps all` replays
everything as before, in finer segments), and `rayforge verify --steps topq:Q` (Q ≤ topq_windows) then replays Q
one-step windows per epoch instead of Q whole checkpoint segments, as Proof-of-Learning's top-Q replays the largest
updates. The windows are chosen from the exported trajectory itself, so a window's neighbours need no second pass:
the states before and after each epoch's current top steps are held in memory (2 x topq_windows states) and
written when the epoch ends. topq_windows=0 writes the log's own checkpoints only (the format before windows).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from rayforge.data import point_sha256
from rayforge.errors import RayforgeError
from rayforge.por.artifact import MANIFEST, POR_FORMAT, STEPS_FILE, l2_distance, model_sha256, params_of, \
    read_manifest
from rayforge.rebuild.engine import d_theta
from rayforge.rebuild.forged_log import ForgedLogs
from rayforge.io import atomic_write_json, check_fresh_dir, save_tensors, staged_dir, write_parquet
from rayforge.train.log import check_state, ckpt_name, read_checkpoint, save_checkpoint, state_tensors, \
    steps_table, write_checkpoint
from rayforge.train.replay import replay_steps
from rayforge.train.run import TrainingRun, hyper_of, new_model, set_determinism

DEPLOYED_FORMAT = "rayforge-model-1"
TOPQ_WINDOWS = 1  # one-step windows per epoch around the largest updates (`rayforge verify --steps topq:1`)


def _original_final(run: TrainingRun) -> dict[str, torch.Tensor]:
    """The original log's final state (θ* and its buffers), checked against the model."""
    path = run.traj_dir / ckpt_name(run.total_steps)
    tensors = read_checkpoint(path)
    model = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
    check_state(tensors, model, str(path), need_velocity=bool(run.cfg.train.momentum))
    return tensors


def write_deployed_model(run: TrainingRun, path: str | Path) -> str:
    """Write what a model owner deploys: the original final parameters (param/*) and buffers (buffer/*), no
    optimizer state, as safetensors (atomically). Returns its `model_sha256`, the PoR's "deployed_sha256"."""
    path = Path(path)
    tensors = _original_final(run)
    deployed = {k: v for k, v in tensors.items() if k.startswith(("param/", "buffer/"))}
    save_tensors(path, deployed, tag=DEPLOYED_FORMAT)
    return model_sha256(params_of(deployed))


def export_por(run: TrainingRun, strategy: str, point: int, out_dir: str | Path,
               device: torch.device | None = None, topq_windows: int = TOPQ_WINDOWS) -> dict:
    """Write the PoR of training point `point` into `out_dir` (which must not exist or be empty); return por.json.

    The directory is built in a temporary sibling and renamed into place at the end: a failure leaves nothing.
    `device` defaults to the run's (`train.device`), like phase 2's rebuild; `topq_windows`: see the module.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _export_por(run, strategy, point, Path(out_dir), device, topq_windows)
    finally:
        torch.set_num_threads(previous_threads)


def _export_por(run: TrainingRun, strategy: str, point, out_dir: Path, device: torch.device | None,
                topq_windows: int) -> dict:
    check_fresh_dir(out_dir)
    n = int(run.info["n"])
    if isinstance(point, bool) or not isinstance(point, (int, np.integer)) or not 0 <= int(point) < n:
        raise RayforgeError(f"--point must be a training-point index in [0, {n}), got {point!r}")
    point = int(point)

    logs = ForgedLogs(run, strategy)
    group = int(logs.splits.group_of[point])
    glog = logs.group_log(group)
    members = np.sort(np.asarray(glog.members, dtype=np.int64))
    forged = glog.steps(run.steps)
    for t, batch in enumerate(forged.batch):  # phase 1 guarantees this; a PoR must never rest on a bad table
        if np.isin(batch, members).any():
            raise RayforgeError(f"the forged log of group {group} uses one of its own members at step {t}; "
                                f"phase-1 output of strategy '{strategy}' is inconsistent")

    first = glog.first_step if glog.forged else run.total_steps
    ds = run.load_dataset()
    device = device or run.device()
    return write_por(run, forged, first, out_dir, exclude_claim(run, ds, point, members), run.tensor_data(ds, device),
                     device, topq_windows=topq_windows)


def base_manifest(run: TrainingRun, final: dict[str, torch.Tensor], theta_star: dict[str, torch.Tensor],
                  checkpoints: list[int]) -> dict:
    """The keys every kind of por.json has: the training, the `checkpoints`, and the claims ε, d_θ about the
    deployed `theta_star` for the forged model `final`."""
    epsilon = l2_distance(final, theta_star)
    if not math.isfinite(epsilon):
        raise RayforgeError("the forged model has non-finite parameters")
    t = run.cfg.train
    return {
        "format": POR_FORMAT,
        "deployed_sha256": model_sha256(theta_star),
        "training": {"model": run.cfg.model.name, "in_shape": [int(d) for d in run.info["shape"]],
                     "batch_size": t.batch_size, "momentum": float(t.momentum),
                     "weight_decay": float(t.weight_decay), "lr": float(t.lr), "lr_schedule": t.lr_schedule,
                     "epochs": t.epochs, "threads": t.threads, "flip": bool(run.cfg.data.flip)},
        "checkpoints": sorted(int(c) for c in checkpoints),
        "epsilon": epsilon,
        "d_theta": d_theta(final, theta_star),
    }


def dataset_block(run: TrainingRun) -> dict:
    """por.json "dataset": how a verifier rebuilds D (its data config without the owner's paths), its size and
    hash."""
    data_cfg = run.cfg.to_dict()["data"]
    data_cfg["data_root"] = None  # a path on the owner's machine means nothing to a verifier
    return {"config": data_cfg, "seed": int(run.cfg.seed), "n": int(run.info["n"]),
            "train_sha256": run.info["train_sha256"]}


def exclude_claim(run: TrainingRun, ds, point: int, members) -> dict:
    """The kind-specific keys of an exclude PoR: the point, its content hash, its group, and D."""
    return {"kind": "exclude", "point": point, "point_sha256": point_sha256(ds.train, point),
            "excluded": [int(m) for m in members], "dataset": dataset_block(run)}


def por_manifest(run: TrainingRun, ds, point: int, members, final: dict[str, torch.Tensor],
                 theta_star: dict[str, torch.Tensor]) -> dict:
    """por.json of the exclude PoR of `point` (excluding `members`) whose final parameters are `final`, about the
    deployed `theta_star`, with the log's checkpoints."""
    return {**base_manifest(run, final, theta_star, run.checkpoints), **exclude_claim(run, ds, point, members)}


def write_por(run: TrainingRun, forged, first: int, out_dir: Path, claim: dict, data=None,
              device: torch.device | None = None, files: dict[str, dict[str, torch.Tensor]] | None = None,
              topq_windows: int = TOPQ_WINDOWS) -> dict:
    """Replay the forged log `forged` (a Steps equal to the original before step `first`) on `data` (default: D's
    training tensors) from the last checkpoint before `first`, and write the PoR into `out_dir`: its checkpoints
    (the log's, plus the `topq_windows` one-step windows per epoch around the largest updates, see the module), the
    log, por.json (`base_manifest` plus the kind-specific `claim`) and `files` (name -> tensors, safetensors).
    Returns por.json."""
    if isinstance(topq_windows, bool) or not isinstance(topq_windows, int) or topq_windows < 0:
        raise RayforgeError(f"topq_windows must be an integer >= 0, got {topq_windows!r}")
    set_determinism(run.cfg.train.threads)
    device = device or run.device()
    data = data or run.tensor_data(run.load_dataset(), device)
    hyper = hyper_of(run.cfg)
    momentum = bool(run.cfg.train.momentum)
    start = max(c for c in run.checkpoints if c <= first)
    original_final = _original_final(run)
    theta_star = params_of(original_final)

    with staged_dir(out_dir) as tmp_dir:
        # Up to `start` the forged trajectory is the original one: its checkpoints, checked, byte for byte.
        template = new_model(run.cfg, run.info["shape"], torch.device("cpu"), run.num_classes)
        for c in (c for c in run.checkpoints if c <= start):
            src = run.traj_dir / ckpt_name(c)
            check_state(read_checkpoint(src), template, str(src), need_velocity=momentum)
            shutil.copyfile(src, tmp_dir / ckpt_name(c))
        model, velocity = run.model_at(start, device)
        windows = LargestUpdates(topq_windows, run.total_steps // run.cfg.train.epochs, tmp_dir, run.checkpoints)
        state = (lambda: state_tensors(model, velocity if momentum else None)) if topq_windows else None
        before = state() if state else None
        for t in range(start, run.total_steps):
            replay_steps(model, velocity, data, forged, t, t + 1, hyper)
            if state:
                after = state()
                windows.offer(t, before, after)
                before = after
            if t + 1 in run.checkpoints:
                save_checkpoint(tmp_dir / ckpt_name(t + 1), model, velocity if momentum else None, t + 1)
        final = {k: v.detach().to("cpu") for k, v in model.named_parameters()}
        write_parquet(tmp_dir / STEPS_FILE, steps_table(forged.batch, forged.flip, forged.lr))
        for name, tensors in (files or {}).items():
            save_tensors(tmp_dir / name, tensors)
        checkpoints = set(run.checkpoints) | windows.flush()
        manifest = {**base_manifest(run, final, theta_star, checkpoints), **claim}
        atomic_write_json(tmp_dir / MANIFEST, manifest)
        read_manifest(tmp_dir)  # what we write must pass the verifier's own schema check
    return manifest


class LargestUpdates:
    """Per epoch, the `q` steps t with the largest update ‖θ_{t+1} − θ_t‖₂ (ties: the earlier step), and the
    checkpoints t, t+1 around them, written into `out_dir` once the replay has left that epoch (those of the log's
    own `checkpoints` are written by the caller)."""

    def __init__(self, q: int, steps_per_epoch: int, out_dir: Path, checkpoints: list[int]):
        self.q, self.steps_per_epoch, self.out_dir = q, steps_per_epoch, out_dir
        self.epoch, self.top = None, []  # the epoch being replayed; its [(-norm, t, before, after)], best first
        self.logged, self.written = set(checkpoints), set()

    def offer(self, t: int, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        """Step t took the model from state `before` to `after` (checkpoint tensors, as `state_tensors` gives)."""
        if t // self.steps_per_epoch != self.epoch:
            self.flush()
            self.epoch = t // self.steps_per_epoch
        norm = l2_distance(params_of(after), params_of(before))  # the verifier's update norm, bit for bit
        self.top = sorted(self.top + [(-norm, t, before, after)], key=lambda r: r[:2])[:self.q]

    def flush(self) -> set[int]:
        """Write the kept windows' checkpoints; every window step written so far."""
        for _, t, before, after in self.top:
            for step, tensors in ((t, before), (t + 1, after)):
                if step not in self.written and step not in self.logged:
                    write_checkpoint(self.out_dir / ckpt_name(step), tensors, step)
                    self.written.add(step)
        self.top = []
        return set(self.written)
