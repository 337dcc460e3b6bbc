"""The statistics that `kiln bench serve` and the server report, against numpy on data that exposes
a wrong formula: one value, two, odd and even counts, unsorted input, ties, negative values,
heavy tails and values far from 1 (percentiles interpolate linearly, as numpy's default)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from kiln.runtime.async_engine import RequestStats
from kiln.runtime.bench_serve import percentiles

PS = (50, 90, 99)


def check_against_numpy(xs, scale: float = 1.0):
    given = list(xs)
    got = percentiles(given, scale=scale)
    assert given == list(xs), "percentiles() changed its input"
    assert set(got) == {"mean", *(f"p{p}" for p in PS)}
    want = {"mean": float(np.mean(xs)), **{f"p{p}": float(np.percentile(xs, p)) for p in PS}}
    tol = 1e-12 * max(abs(v) for v in xs) * abs(scale)  # numpy sums and interpolates in another order
    for k, w in want.items():
        assert got[k] == pytest.approx(w * scale, rel=1e-12, abs=tol), (k, got, len(xs))


def test_one_value():
    assert percentiles([0.25], scale=1000.0) == {"mean": 250.0, "p50": 250.0, "p90": 250.0, "p99": 250.0}
    check_against_numpy([0.25], 1000.0)
    check_against_numpy([-7.0])


def test_two_values_interpolate():
    # Nearest-rank would give 1 or 3 for p50; numpy's linear default gives the midpoint.
    got = percentiles([3.0, 1.0], scale=1.0)
    assert got["p50"] == pytest.approx(2.0) and got["p90"] == pytest.approx(2.8)
    assert got["p99"] == pytest.approx(2.98) and got["mean"] == pytest.approx(2.0)
    check_against_numpy([3.0, 1.0])


def test_even_and_odd_counts_unsorted():
    got = percentiles([4.0, 1.0, 3.0, 2.0], scale=1.0)
    assert got["p50"] == pytest.approx(2.5)  # the mean of the middle two, not one of them
    assert got["p90"] == pytest.approx(3.7)
    got = percentiles([10.0, 0.0, 5.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0], scale=1.0)
    assert (got["p50"], got["p90"]) == (pytest.approx(5.0), pytest.approx(9.0))
    assert got["p99"] == pytest.approx(9.9)
    for xs in ([4.0, 1.0, 3.0, 2.0], [5.0, 1.0, 4.0], [2.0, 9.0, 9.0, 1.0, 9.0, 0.5]):
        check_against_numpy(xs)


def test_ties_and_constant():
    check_against_numpy([2.0] * 7)
    assert percentiles([2.0] * 7, scale=1.0)["p99"] == 2.0
    check_against_numpy([1.0, 1.0, 1.0, 5.0, 5.0])
    check_against_numpy([0.0, 0.0, 0.0, 0.0, 1.0])  # p90 and p99 fall between the last two


def test_scale_multiplies_every_statistic():
    xs = [0.003, 0.001, 0.002, 0.010]
    s1, s1000 = percentiles(xs, scale=1.0), percentiles(xs)  # default: seconds -> milliseconds
    for k in s1:
        assert s1000[k] == pytest.approx(1000.0 * s1[k], rel=1e-12)
    check_against_numpy(xs, 1000.0)


def test_empty_is_nan():
    got = percentiles([], scale=1000.0)
    assert set(got) == {"mean", "p50", "p90", "p99"} and all(math.isnan(v) for v in got.values())


@pytest.mark.parametrize("seed", range(6))
def test_random_data_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    sizes = list(range(1, 41)) + [99, 100, 101, 1000, 1001]
    for n in sizes:
        for xs in (rng.random(n),  # uniform in [0, 1)
                   rng.lognormal(-4.0, 1.5, n),  # latency-like: seconds, a heavy tail
                   rng.integers(0, 4, n).astype(float),  # many ties
                   rng.normal(0.0, 1e6, n)):  # negative values, far from 1
            check_against_numpy(xs.tolist(), 1.0 if seed % 2 else 1000.0)


def test_percentiles_are_ordered_and_within_range():
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 57):
        xs = rng.exponential(0.05, n).tolist()
        got = percentiles(xs, scale=1.0)
        assert min(xs) <= got["p50"] <= got["p90"] <= got["p99"] <= max(xs)
        assert min(xs) <= got["mean"] <= max(xs)


def test_request_latencies():
    """TTFT = first token - arrival, e2e = finished - arrival, TPOT = the mean gap between the
    tokens after the first: (finished - first token) / (tokens - 1)."""
    times = [10.5, 10.6, 10.65, 11.0, 12.5]  # when each of 5 tokens arrived; the last one finishes
    s = RequestStats("r", arrival=10.0, first_token=times[0], finished=times[-1], generated_tokens=len(times))
    assert s.ttft == pytest.approx(0.5) and s.e2e == pytest.approx(2.5)
    assert s.tpot == pytest.approx(float(np.mean(np.diff(times))))
    assert s.tpot == pytest.approx(0.5)


def test_request_latencies_when_undefined():
    assert RequestStats("r", arrival=1.0).ttft is None
    assert RequestStats("r", arrival=1.0).e2e is None
    assert RequestStats("r", arrival=1.0, first_token=2.0).tpot is None  # not finished
    one = RequestStats("r", arrival=1.0, first_token=2.0, finished=2.0, generated_tokens=1)
    assert one.tpot is None and one.ttft == pytest.approx(1.0) and one.e2e == pytest.approx(1.0)  # no gap
    aborted = RequestStats("r", arrival=1.0, finished=3.0)  # left before its first token
    assert aborted.ttft is None and aborted.tpot is None and aborted.e2e == pytest.approx(2.0)
