"""The phi-accrual failure detector: suspicion grows with silence, relative to the peer's rhythm."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lithify.coordinator.phi import PhiAccrualDetector


def beating(every: float, n: int, **kw: float) -> tuple[PhiAccrualDetector, float]:
    d = PhiAccrualDetector(**kw)
    t = 100.0
    for _ in range(n):
        d.heartbeat(t)
        t += every
    return d, t - every


def test_no_suspicion_before_the_first_heartbeat() -> None:
    d = PhiAccrualDetector()
    assert d.phi(1e9) == 0.0
    assert d.last_heartbeat is None
    assert not d.is_suspect(1e9, 1.0)


def test_regular_peer_is_fine_on_time_and_suspect_after_a_long_silence() -> None:
    d, last = beating(1.0, 50)
    assert d.phi(last + 1.0) < 1.0
    assert d.phi(last + 2.0) < 8.0
    assert d.phi(last + 10.0) > 8.0
    assert d.is_suspect(last + 10.0, 8.0)


def test_default_settings_detect_a_dead_compactor_within_seconds() -> None:
    """Contract defaults (threshold 8, min std 0.5 s, 1 s reports): judged dead in < 5 s."""
    d, last = beating(1.0, 20, min_std_s=0.5)
    crossing = next(x / 10 for x in range(1, 200) if d.phi(last + x / 10) > 8.0)
    assert 2.5 < crossing < 5.0


def test_a_single_heartbeat_uses_the_assumed_first_interval() -> None:
    d = PhiAccrualDetector(first_interval_s=1.0, min_std_s=0.5)
    d.heartbeat(0.0)
    assert d.mean() == pytest.approx(1.0)
    assert d.phi(0.5) < 1.0
    assert d.phi(20.0) > 8.0


def test_phi_grows_with_silence_and_never_overflows() -> None:
    d, last = beating(1.0, 10)
    values = [d.phi(last + x) for x in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 100.0, 1e6)]
    assert values == sorted(values)
    assert all(math.isfinite(v) for v in values)
    assert values[-1] > 1e6  # keeps growing instead of saturating at inf


def test_follows_the_peer_rhythm_through_the_window() -> None:
    d, last = beating(1.0, 20, window=10)
    slow = d.phi(last + 5.0)
    t = last
    for _ in range(12):  # the window now only holds 5 s intervals
        t += 5.0
        d.heartbeat(t)
    assert d.samples == 10
    assert d.mean() == pytest.approx(5.0)
    assert d.phi(t + 5.0) < 1.0 < slow


def test_minimum_deviation_for_a_perfectly_regular_peer() -> None:
    d, last = beating(1.0, 100, min_std_s=0.5)
    assert d.std() == pytest.approx(0.5)
    # Without the floor a few ms late would already look like death.
    assert d.phi(last + 1.05) < 1.0


def test_matches_the_normal_tail_closely() -> None:
    d, last = beating(1.0, 100, min_std_s=0.5)
    mean, std = d.mean(), d.std()
    # The logistic approximation is close in the body and drifts slowly in the far tail
    # (where the probability itself is tiny anyway).
    for elapsed, rel in (
        (0.5, 0.05),
        (1.0, 0.05),
        (1.5, 0.05),
        (2.0, 0.05),
        (2.5, 0.05),
        (3.0, 0.1),
    ):
        y = (elapsed - mean) / std
        exact = -math.log10(0.5 * math.erfc(y / math.sqrt(2)))
        assert d.phi(last + elapsed) == pytest.approx(exact, abs=0.05, rel=rel)


def test_clock_going_backwards_adds_no_interval() -> None:
    d, last = beating(1.0, 5)
    n = d.samples
    d.heartbeat(last - 3.0)
    assert d.samples == n
    assert d.last_heartbeat == last


@pytest.mark.parametrize("kw", [{"window": 1}, {"min_std_s": 0.0}, {"first_interval_s": -1.0}])
def test_bad_settings_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        PhiAccrualDetector(**kw)


@settings(max_examples=60, deadline=None)
@given(
    intervals=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=40),
    probes=st.lists(st.floats(0.0, 1000.0), min_size=2, max_size=10),
)
def test_phi_is_non_decreasing_in_silence(intervals: list[float], probes: list[float]) -> None:
    d = PhiAccrualDetector(window=16)
    t = 0.0
    d.heartbeat(t)
    for i in intervals:
        t += i
        d.heartbeat(t)
    values = [d.phi(t + p) for p in sorted(probes)]
    assert all(v >= 0.0 and math.isfinite(v) for v in values)
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:], strict=False))
