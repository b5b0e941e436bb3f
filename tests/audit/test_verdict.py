"""The verdict rule and the anomaly index's spread floor, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from kdguard.audit.anomaly import anomaly_index
from kdguard.audit.verdict import BACKDOORED, CLEAN, SUSPICIOUS, decide
from kdguard.errors import KDGuardError


def test_min_spread_floors_the_mad():
    sizes = [1.0, 1.0, 1.0, 1.0, 0.5]  # MAD 0: without a floor the small one is infinitely anomalous
    assert anomaly_index(sizes)[4] == math.inf
    # median 1, spread max(1.4826·0, 0.1) = 0.1 → (1 − 0.5) / 0.1 = 5
    assert anomaly_index(sizes, min_spread=0.1) == pytest.approx([0, 0, 0, 0, 5.0])
    # a floor below the real spread changes nothing: sizes 1..5, median 3, MAD 1 → spread 1.4826
    assert anomaly_index([1, 2, 3, 4, 5], min_spread=0.5) == pytest.approx(anomaly_index([1, 2, 3, 4, 5]))
    assert anomaly_index([1, 2, 3, 4, 5], min_spread=3.0) == pytest.approx([2 / 3, 1 / 3, 0, -1 / 3, -2 / 3])
    with pytest.raises(KDGuardError):
        anomaly_index(sizes, min_spread=-1)


def test_two_signals_on_one_class_is_backdoored():
    v = decide({"mask": [0, 3.0, 0, 0], "additive": [0, 2.5, 0, 0], "shuffle": [0, 0, 0, 2.1]})
    assert v.verdict == BACKDOORED and v.targets == [1]
    assert v.signals == {1: ["mask", "additive"], 3: ["shuffle"]}


def test_single_signals_are_suspicious_strongest_first():
    v = decide({"mask": [2.5, 0, 0], "additive": [0, 0, 4.0], "shuffle": [0, 0, 0]})
    assert v.verdict == SUSPICIOUS and v.targets == [2, 0]


def test_no_signal_is_clean_and_threshold_is_strict():
    v = decide({"mask": [2.0, -5, 1.9], "additive": [0, 0, 0]})
    assert v.verdict == CLEAN and v.targets == [] and v.signals == {}


def test_votes_and_ordering():
    idx = {"mask": [3, 9, 0], "additive": [3, 0, 0], "shuffle": [3, 0, 0]}
    v = decide(idx)
    assert v.verdict == BACKDOORED and v.targets == [0]  # three signals beat one larger index
    assert decide(idx, votes=1).targets == [0, 1]
    assert decide({"mask": [0, math.inf, 0]}, votes=1).verdict == BACKDOORED


@pytest.mark.parametrize("indices, kw", [
    ({}, {}),
    ({"size": [1, 2]}, {}),
    ({"mask": [1, 2], "additive": [1]}, {}),
    ({"mask": [1, 2]}, {"threshold": 0}),
    ({"mask": [1, 2]}, {"votes": 2}),
])
def test_bad_input_is_refused(indices, kw):
    with pytest.raises(KDGuardError):
        decide(indices, **kw)


def test_given_signals_replace_the_threshold_test():
    v = decide({"mask": [0, 3.0, 0], "shuffle": [0.1, 0.9, 0.2]}, signals={"shuffle": [False, True, False]})
    assert v.verdict == BACKDOORED and v.targets == [1] and v.signals == {1: ["mask", "shuffle"]}
    # a share above the index threshold is not a signal unless the given booleans say so
    assert decide({"mask": [0, 0, 0], "shuffle": [3, 3, 3]}, signals={"shuffle": [False] * 3}).verdict == CLEAN
    with pytest.raises(KDGuardError):
        decide({"mask": [0, 0]}, signals={"shuffle": [True, False]})
    with pytest.raises(KDGuardError):
        decide({"mask": [0, 0], "shuffle": [0, 0]}, signals={"shuffle": [True]})
