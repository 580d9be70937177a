"""`ray job submit` entrypoint for the whole pipeline: the same code path as `rayforge run`.

    ray job submit --working-dir . -- python jobs/run.py CONFIG --out RUN [--set key=value ...]
"""

import sys

from rayforge.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
