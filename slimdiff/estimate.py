"""How long calibration will take, measured on the first prompts and said once, before the long part.

The defaults (500 prompts × 25 steps, two passes) suit a GPU; on a laptop CPU even builtin:tiny takes tens of
minutes, and a progress bar of the current pass does not tell the total. The commands pass
:class:`CalibrationClock` as calibration's ``on_batch`` callback when they run on a CPU.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class CalibrationClock:
    """``on_batch(stage, batches_done)`` callback: after the first measured chunk of each pass, one line with the
    measured seconds per prompt and the expected time left for the whole calibration.

    Calibration reports the batches of a chunk (``chunk_batches``, its ``checkpoint_every``) together, once the
    chunk is summed and checkpointed: the first report of a chunk is timed over all of its batches and the rest
    are skipped (timing each would divide a chunk's time by one batch, then by none)."""

    def __init__(self, prog: str, num_prompts: int, pass1_prompts: int, batch_size: int = 1, stream=None,
                 chunk_batches: int = 1):
        self.prog, self.batch_size, self.chunk = prog, batch_size, max(1, chunk_batches)
        self.batches = {"pass1": -(-min(pass1_prompts, num_prompts) // batch_size),
                        "pass2": -(-num_prompts // batch_size)}
        self.prompts = {"pass1": min(pass1_prompts, num_prompts), "pass2": num_prompts}
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.covered: dict[str, int] = {}  # batches of each pass already timed
        self.said: set[str] = set()
        self.seen: set[str] = set()

    def __call__(self, stage: str, batches_done: int) -> None:
        covered = self.covered.get(stage, 0)
        if batches_done <= covered:  # the rest of a chunk already timed with its first report
            return
        now = time.perf_counter()
        end = min(-(-batches_done // self.chunk) * self.chunk, self.batches[stage])
        per_batch = (now - self.started) / (end - covered)
        self.covered[stage], self.started = end, now
        # The first chunk of a run pays one-time costs (first kernel choices, allocations): when the pass has
        # a full chunk (and, for single-batch chunks, one more batch) to come, the next one is measured instead.
        warming = stage not in self.seen and self.batches[stage] - end >= max(2, self.chunk)
        self.seen.add(stage)
        if stage not in self.said and not warming:
            self.said.add(stage)
            left = self.batches[stage] - end
            if stage == "pass1":  # pass 2 costs at least as much per prompt (it accumulates more moments)
                left += self.batches["pass2"]
            if left == 0:  # the whole pass was one chunk: nothing left to foretell
                return
            per_prompt = per_batch / self.batch_size
            what = ("calibration" if stage == "pass1" else "calibration pass 2")
            tqdm.write(f"{self.prog}: {what} runs at {per_prompt:.1f} s per prompt on this CPU: about "
                       f"{_duration(per_batch * left)} left for {self.prompts['pass1']} + {self.prompts['pass2']} "
                       "prompts (shorter: fewer --num-prompts, --pass1-prompts or --steps)", file=self.stream)
