"""`ray job submit` entrypoint for training alone: the same code path as `rayforge train`.

    ray job submit --working-dir . -- python jobs/train.py CONFIG --out RUN [--set key=value ...]
"""

import sys

from rayforge.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
