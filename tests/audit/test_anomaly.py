"""The MAD anomaly index against hand-computed values."""

from __future__ import annotations

import math

import pytest

from kdguard.audit import anomaly_index, flagged_classes
from kdguard.errors import KDGuardError


def test_index_by_hand():
    # sizes 1,8,9,10,12: median 9; |s - 9| = 8,1,0,1,3 → MAD 1; spread 1.4826
    index = anomaly_index([1, 8, 9, 10, 12])
    expected = [8 / 1.4826, 1 / 1.4826, 0.0, -1 / 1.4826, -3 / 1.4826]
    assert index == pytest.approx(expected)
    assert flagged_classes([1, 8, 9, 10, 12]) == [0]


def test_even_count_uses_the_mean_of_the_middle_values():
    # sizes 2,10,12,14: median 11; deviations 9,1,1,3 → MAD (1+3)/2 = 2
    index = anomaly_index([2, 10, 12, 14])
    assert index == pytest.approx([9 / (1.4826 * 2), 1 / (1.4826 * 2), -1 / (1.4826 * 2),
                                   -3 / (1.4826 * 2)])
    assert flagged_classes([2, 10, 12, 14]) == [0]  # 9 / 2.9652 ≈ 3.04 > 2


def test_only_the_small_side_is_flagged():
    assert flagged_classes([10, 10.5, 9.5, 10, 40]) == []
    assert anomaly_index([10, 10.5, 9.5, 10, 40])[4] < -2


def test_threshold_is_strict_and_orders_by_index():
    sizes = [0.0, 1.0, 9.0, 10.0, 10.0, 11.0, 12.0]  # median 10, MAD 1
    index = anomaly_index(sizes)
    assert index[0] == pytest.approx(10 / 1.4826) and index[1] == pytest.approx(9 / 1.4826)
    assert flagged_classes(sizes) == [0, 1]
    assert flagged_classes(sizes, threshold=index[1]) == [0]


def test_mad_zero():
    assert anomaly_index([5, 5, 5, 5]) == [0.0] * 4
    assert flagged_classes([5, 5, 5, 5]) == []
    index = anomaly_index([1, 5, 5, 5, 9])
    assert index == [math.inf, 0.0, 0.0, 0.0, -math.inf]
    assert flagged_classes([1, 5, 5, 5, 9]) == [0]


@pytest.mark.parametrize("sizes, words", [([3.0], "at least 2"), ([1, float("nan")], "finite"),
                                          ([1, -2], "non-negative")])
def test_bad_sizes(sizes, words):
    with pytest.raises(KDGuardError, match=words) as err:
        anomaly_index(sizes)
    assert "\n" not in str(err.value)


def test_bad_threshold():
    with pytest.raises(KDGuardError, match="positive"):
        flagged_classes([1, 2, 3], threshold=0)
