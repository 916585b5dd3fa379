"""Run under torchrun by tests/test_distributed.py: calibrate builtin:tiny over the first N packaged prompts.

Every rank appends the seeds it samples to ``<seed-log>.<rank>``. With ``--kill-rank R --kill-seed S`` rank R
SIGKILLs itself, like a lost machine, when it is about to sample seed S — once (a marker file remembers), and
after ``--kill-when-exists PATH`` appears if given, so that what the other rank holds by then is certain.
"""

import argparse
import os
import signal
import time
from pathlib import Path

from slimdiff.calibrate import CalibrationConfig, calibrate, pipeline_loop
from slimdiff.distributed import process_group
from slimdiff.models import build_builtin
from slimdiff.prompts import read_prompts

CONFIG = CalibrationConfig(steps=3, pass1_prompts=2, batch_size=1, checkpoint_every=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, required=True)
    p.add_argument("--seed-log", required=True)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-seed", type=int, default=-1)
    p.add_argument("--kill-when-exists", default=None)
    args = p.parse_args()
    pipe = build_builtin("builtin:tiny")
    sample = pipeline_loop(pipe, CONFIG)
    with process_group("cpu") as group:
        marker = Path(f"{args.seed_log}.killed")

        def loop(prompts, seeds):
            if group.rank == args.kill_rank and args.kill_seed in seeds and not marker.exists():
                marker.touch()
                deadline = time.monotonic() + 120
                while args.kill_when_exists and not Path(args.kill_when_exists).exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{args.kill_when_exists} never appeared")
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            with open(f"{args.seed_log}.{group.rank}", "a", encoding="utf-8") as log:
                log.writelines(f"{s}\n" for s in seeds)
            sample(prompts, seeds)

        calibrate(pipe, read_prompts(limit=args.prompts), args.out, CONFIG, loop=loop, progress=False, group=group)


if __name__ == "__main__":
    main()
