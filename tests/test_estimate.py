"""The calibration duration estimate on a CPU: arithmetic on a fake clock, and the line the CLI prints."""

import io

from slimdiff import estimate
from slimdiff.cli import main


def test_estimate_counts_what_is_left_of_both_passes(monkeypatch):
    # start, pass-1 batches 1-3, pass-2 batches 1-3 (the first batch of each pass is a warm-up and not measured)
    now = iter([100.0, 150.0, 162.0, 163.0, 300.0, 387.0, 388.0])
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: next(now))
    out = io.StringIO()
    clock = estimate.CalibrationClock("slimdiff", num_prompts=500, pass1_prompts=64, batch_size=2, stream=out)
    clock("pass1", 1)
    clock("pass1", 2)  # 12 s for a batch of 2: 30 pass-1 + 250 pass-2 batches left → 3360 s
    clock("pass1", 3)
    clock("pass2", 1)
    clock("pass2", 2)  # 87 s per batch: 248 batches left
    clock("pass2", 3)
    lines = out.getvalue().splitlines()
    assert lines == [
        "slimdiff: calibration runs at 6.0 s per prompt on this CPU: about 56 min left for 64 + 500 prompts "
        "(shorter: fewer --num-prompts, --pass1-prompts or --steps)",
        "slimdiff: calibration pass 2 runs at 43.5 s per prompt on this CPU: about 6.0 h left for 64 + 500 prompts "
        "(shorter: fewer --num-prompts, --pass1-prompts or --steps)"]


def test_cpu_calibration_says_how_long_it_will_take(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    assert main(["calibrate", "--model", "builtin:tiny", "--device", "cpu", "--prompts", str(prompts),
                 "--num-prompts", "2", "--steps", "2", "--pass1-prompts", "1", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "per prompt on this CPU" in line]
    # pass 2 is one chunk (2 batches of the default 8): once it is timed nothing is left to announce
    assert len(said) == 1 and said[0].startswith("slimdiff: calibration runs at") and "for 1 + 2 prompts" in said[0]


def test_a_chunk_reported_at_once_is_timed_over_all_its_batches(monkeypatch):
    # calibration reports the 8 batches of a chunk together after the chunk: 80 s per chunk = 10 s per batch
    now = iter([0.0, 100.0, 180.0])
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: next(now))
    out = io.StringIO()
    clock = estimate.CalibrationClock("slimdiff", num_prompts=32, pass1_prompts=32, chunk_batches=8, stream=out)
    for done in range(1, 9):  # first chunk: warm-up, not measured
        clock("pass1", done)
    for done in range(9, 17):
        clock("pass1", done)
    assert out.getvalue().splitlines() == [
        "slimdiff: calibration runs at 10.0 s per prompt on this CPU: about 8 min left for 32 + 32 prompts "
        "(shorter: fewer --num-prompts, --pass1-prompts or --steps)"]
