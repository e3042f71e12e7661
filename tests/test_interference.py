"""The function-space interference measure on matrices whose answer is known by hand."""

from __future__ import annotations

import math

import pytest

from jumplora.metrics.interference import interference, nll_increases

# L[i][j]: task 1 raises task 0's NLL by 0.5; task 2 raises task 0's by 0.25 and task 1's by 1.0.
L = [[1.0, 3.0, 3.0], [1.5, 0.5, 3.0], [1.75, 1.5, 0.25]]


def test_increases_are_the_row_to_row_change_on_earlier_tasks_only():
    assert nll_increases(L) == [[0.5], [0.25, 1.0]]


def test_interference_normalises_by_the_later_tasks_update():
    out = interference(L, update_norms=[9.0, 2.0, 1.25], kept_entries=[10, 1_000_000, 500_000])
    first, second = out["per_task"]
    assert first == {"task": 1, "increase": 0.5, "per_norm": 0.25, "per_million_entries": 0.5}
    assert second["increase"] == 0.625 and second["per_norm"] == 0.5
    assert math.isclose(second["per_million_entries"], 1.25)
    assert out["increase"] == pytest.approx(0.5625) and out["per_norm"] == pytest.approx(0.375)
    assert out["per_million_entries"] == pytest.approx(0.875)


def test_missing_norms_leave_the_normalised_columns_empty_and_bad_shapes_fail():
    out = interference(L)
    assert out["increase"] == pytest.approx(0.5625) and out["per_norm"] is None and out["per_million_entries"] is None
    with pytest.raises(ValueError, match="update_norms has 2 values for 3 tasks"):
        interference(L, update_norms=[1.0, 2.0])
    with pytest.raises(ValueError, match="T ≥ 2"):
        nll_increases([[1.0]])


def test_a_none_cell_propagates_as_nan_not_as_zero():
    out = interference([[1.0, None], [None, 0.5]])
    assert math.isnan(out["increase"])
