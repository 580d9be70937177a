"""Print the runtime environment for `ray job submit --runtime-env-json`: this checkout as the working directory
(without run outputs, W&B files, caches and virtualenvs) and the environment variables the job needs. They reach
the job's driver and every task and actor it starts; the submitting shell's environment does not.

    python jobs/runtime_env.py [KEY=VALUE ...]

Passed from this shell when set: the W&B settings (WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY,
WANDB_BASE_URL). KEY=VALUE arguments add or override variables, e.g. RAYFORGE_DATA=/home/ray/data: a path on the
cluster's head node, which is why this shell's own $RAYFORGE_DATA is not passed. Whatever is passed, W&B's API key
included, is stored with the job and shown in the Ray dashboard to whoever can reach it.
"""

from __future__ import annotations

import json
import os
import sys

PASSED = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL")
EXCLUDES = [".git", ".venv", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.npy"]


def runtime_env(assignments: list[str], environ: dict[str, str]) -> dict:
    env_vars = {key: environ[key] for key in PASSED if environ.get(key)}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        env_vars[key] = value
    return {"working_dir": ".", "excludes": EXCLUDES, "env_vars": env_vars}


if __name__ == "__main__":
    try:
        print(json.dumps(runtime_env(sys.argv[1:], dict(os.environ))))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
