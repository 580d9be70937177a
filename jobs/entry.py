"""What the `ray job submit` entrypoints share: the run directory must survive the job.

A submitted job runs in Ray's temporary copy of the working directory on the head node, so a relative `--out`
would land there and be lost with it: inside a Ray job, `--out` must be absolute (`~` is expanded on the head).
Only the job's driver writes the run directory, on the head node's disk; copy it back with `ray rsync-down`.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the environment of a submitted job's entrypoint


def out_args(argv: list[str], in_ray_job: bool) -> tuple[list[str], Path | None]:
    """`argv` with `--out` expanded; ValueError (one line) for a relative `--out` inside a Ray job."""
    args, out = list(argv), None
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            at, value, form = i + 1, argv[i + 1], "{}"
        elif arg.startswith("--out="):
            at, value, form = i, arg[len("--out="):], "--out={}"
        else:
            continue
        out = Path(value).expanduser()
        if in_ray_job and not out.is_absolute():
            raise ValueError(f"--out {value!r} is relative, and a Ray job runs in a temporary copy of the working "
                             "directory: give an absolute path on the head node, e.g. /home/ray/runs/NAME")
        args[at] = form.format(out)
    return args, out


def run_command(command: str, argv: list[str]) -> None:
    """`rayforge COMMAND ARGV...` with `--out` checked, telling where the run directory lands."""
    from rayforge.cli import main

    in_ray_job = RAY_JOB_ENV in os.environ
    try:
        args, out = out_args(argv, in_ray_job)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if in_ray_job and out is not None:
        print(f"run directory: {out} on {socket.gethostname()} (the head node); copy it back with "
              f"`ray rsync-down cluster.yaml {out} ./runs/{out.name}`", flush=True)
    main([command, *args])
