"""`ray job submit` entrypoint for training alone: the same code path as `rayforge train`.

    ray job submit --address http://HEAD:8265 \\
        --runtime-env-json "$(python jobs/runtime_env.py RAYFORGE_DATA=/home/ray/data)" \\
        -- python jobs/train.py CONFIG --out /home/ray/runs/NAME [--set key=value ...]
"""

import sys

from entry import run_command

if __name__ == "__main__":
    run_command("train", sys.argv[1:])
