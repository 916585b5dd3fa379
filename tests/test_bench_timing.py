"""Speed-up statistics (interleaved timing, bootstrap interval, the noisy verdict) on synthetic samples.

Deterministic: no test here times anything real; the samples are drawn from seeded generators.
"""

import numpy as np
import pytest

from slimdiff.bench.timing import judge_speedup, speedup_interval, time_interleaved
from slimdiff.errors import SlimDiffError


def _samples(n, dense_ms, slim_ms, jitter, seed=0, load=None):
    rng = np.random.default_rng(seed)
    load = np.ones(n) if load is None else load
    return (list(dense_ms * load * (1 + jitter * rng.standard_normal(n))),
            list(slim_ms * load * (1 + jitter * rng.standard_normal(n))))


def test_interval_brackets_the_true_ratio_and_is_reproducible():
    dense, slim = _samples(40, 100.0, 80.0, 0.02)
    a, b = speedup_interval(dense, slim, seed=3), speedup_interval(dense, slim, seed=3)
    assert a == b  # seeded
    assert a["low"] < 1.25 < a["high"] and a["low"] <= a["speedup"] <= a["high"]
    assert a["speedup"] == pytest.approx(np.median(np.asarray(dense) / np.asarray(slim)))
    assert a["high"] - a["low"] < 0.05  # 2 % jitter, 40 pairs: a narrow interval


def test_interval_widens_with_noise_and_narrows_with_pairs():
    def width(n, jitter):
        iv = speedup_interval(*_samples(n, 100.0, 80.0, jitter, seed=1))
        return iv["high"] - iv["low"]

    assert width(40, 0.20) > 3 * width(40, 0.02)
    assert width(400, 0.10) < width(20, 0.10)


def test_pairing_cancels_a_load_that_hits_both_calls_of_a_pair():
    # The machine's load triples the latency of half the pairs (another job started): a common factor per pair.
    n = 30
    load = np.where(np.arange(n) % 4 < 2, 1.0, 3.0)
    dense, slim = _samples(n, 100.0, 80.0, 0.01, seed=2, load=load)
    paired = speedup_interval(dense, slim)
    assert paired["low"] < 1.25 < paired["high"]
    # Breaking the pairing (slim samples from other moments) shows what interleaving buys: a wider interval.
    shuffled = list(np.random.default_rng(0).permutation(slim))
    unpaired = speedup_interval(dense, shuffled)
    assert unpaired["high"] - unpaired["low"] > paired["high"] - paired["low"]


def test_a_load_that_varies_from_pair_to_pair_cancels_in_the_pair_ratios():
    # A neighbour's load changes every moment (latency × 1 … 3) and each pair meets one level: each pair's ratio
    # keeps the true 1.25 up to the jitter, while the dense and the slim median come from different pairs (levels).
    n, truth = 20, 1.25
    load = np.random.default_rng(7).uniform(1.0, 3.0, n)
    errors, median_ratio_errors, covered = [], [], 0
    for seed in range(20):
        dense, slim = _samples(n, 100.0, 80.0, 0.005, seed=seed, load=load)
        iv = speedup_interval(dense, slim)
        errors.append(abs(iv["speedup"] - truth))
        median_ratio_errors.append(abs(np.median(dense) / np.median(slim) - truth))
        covered += iv["low"] <= truth <= iv["high"]
        assert iv["high"] - iv["low"] < 0.02
    assert np.mean(errors) < 0.6 * np.mean(median_ratio_errors)
    assert covered >= 16  # a 95 % interval from 20 pairs; the VM study measured 92–93 % coverage


def test_noisy_when_the_interval_is_wide():
    interval = speedup_interval(*_samples(10, 100.0, 80.0, 0.30, seed=4))
    reasons = judge_speedup(interval, ideal=1.4)
    assert any("interval" in r for r in reasons)


def test_noisy_when_the_speedup_beats_the_ideal():
    # ORT 0.4 batch 1 on a loaded 2-core CPU: 2.02× measured against an ideal of 1.22× (issue 12).
    interval = {"speedup": 2.024, "low": 2.00, "high": 2.05}
    reasons = judge_speedup(interval, ideal=1.22)
    assert len(reasons) == 1 and "exceeds the ideal" in reasons[0]
    # A few percent above the ideal is within the allowance (cache effects, rounding of MAC counts).
    assert judge_speedup({"speedup": 1.26, "low": 1.25, "high": 1.27}, ideal=1.22) == []


def test_a_tight_speedup_below_the_ideal_is_a_result():
    interval = speedup_interval(*_samples(40, 100.0, 90.0, 0.01, seed=5))
    assert judge_speedup(interval, ideal=1.2) == []


@pytest.mark.parametrize("dense,slim", [([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([1.0, -2.0], [1.0, 1.0])])
def test_bad_samples_are_refused(dense, slim):
    with pytest.raises(SlimDiffError):
        speedup_interval(dense, slim)


def test_interleaving_alternates_the_order_within_pairs():
    calls = []
    a_ms, b_ms = time_interleaved(lambda: calls.append("a"), lambda: calls.append("b"), "cpu", warmup=1, pairs=4)
    assert len(a_ms) == len(b_ms) == 4
    assert "".join(calls) == "ab" + "ab" + "ba" + "ab" + "ba"  # warm-up, then AB BA AB BA


def test_noisy_when_the_machine_was_busy():
    tight = {"speedup": 1.2, "low": 1.19, "high": 1.21}
    reasons = judge_speedup(tight, ideal=1.3, load=2.4, cpus=2)
    assert len(reasons) == 1 and "busy" in reasons[0] and "2.4 on 2 CPUs" in reasons[0]
    # The benchmark's own thread beside one other job on a 2-CPU machine: every thread had a core.
    assert judge_speedup(tight, ideal=1.3, load=1.9, cpus=2) == []
    assert judge_speedup(tight, ideal=1.3, load=None, cpus=2) == []
