import math

import numpy as np
import pytest

from hf_cft.metrics import (
    AccuracyMatrix,
    accuracy,
    average,
    base_novel_hm,
    base_novel_summary,
    bwt,
    harmonic_mean,
    last,
    matrix_metrics,
    per_class_accuracy,
    plasticity,
    round1,
    transfer,
)
from hf_cft.metrics.continual import average_per_dataset, last_per_dataset, transfer_per_dataset

# condu.md §10: CLIP ViT-B/16 zero-shot row, MTIL Order I
ZS_ORDER_I = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
ORDER_II_POSITIONS = [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]
ZSCL_TRANSFER = [86.0, 67.4, 45.4, 50.4, 69.1, 87.6, 61.8, 86.8, 60.1, 66.8]
ZSCL_AVERAGE = [45.1, 92.0, 80.1, 64.3, 79.5, 81.6, 89.6, 75.2, 88.9, 64.7, 68.0]
ZSCL_LAST = [40.6, 92.2, 81.3, 70.5, 94.8, 90.5, 91.9, 98.7, 93.9, 85.3, 80.2]


def test_zero_shot_fixture_order_i():
    A = np.tile(ZS_ORDER_I, (11, 1))
    assert transfer(A) == pytest.approx(69.39, abs=1e-9)
    assert average(A) == pytest.approx(65.290909, abs=1e-6)
    assert last(A) == pytest.approx(average(A))
    assert round1(transfer(A)) == 69.4
    assert round1(average(A)) == 65.3
    assert round1(last(A)) == 65.3
    assert bwt(A) == pytest.approx(0.0)


def test_zero_shot_fixture_order_ii_rounding():
    row = [ZS_ORDER_I[p] for p in ORDER_II_POSITIONS]
    A = np.tile(row, (11, 1))
    assert transfer(A) == pytest.approx(65.35, abs=1e-9)
    assert round1(transfer(A)) == 65.4  # numpy rounding, as published
    assert f"{transfer(A):.1f}" == "65.3"  # what "%.1f" would have printed instead
    assert round1(average(A)) == 65.3 and round1(last(A)) == 65.3


def test_reorder_matches_order_ii():
    names = [f"d{i}" for i in range(11)]
    m = AccuracyMatrix(names, np.tile(ZS_ORDER_I, (11, 1)))
    m2 = m.reorder([names[p] for p in ORDER_II_POSITIONS])
    assert m2.metrics()["transfer"] == pytest.approx(65.35)


def _zscl_matrix() -> np.ndarray:
    """A matrix whose per-dataset Transfer/Average/Last are ZSCL's published values: rows before c hold the
    Transfer value, the last row the Last value, the rows in between the value that makes the column mean
    equal Average (a definition using r <= c or excluding the last row would give other numbers)."""
    T = 11
    A = np.zeros((T, T))
    for c in range(T):
        tr = ZSCL_TRANSFER[c - 1] if c > 0 else 0.0
        A[:c, c] = tr
        A[T - 1, c] = ZSCL_LAST[c]
        free = T - 1 - c
        if free > 0:
            A[c : T - 1, c] = (ZSCL_AVERAGE[c] * T - c * tr - ZSCL_LAST[c]) / free
    return A


def test_zscl_per_dataset_values():
    A = _zscl_matrix()
    np.testing.assert_allclose(transfer_per_dataset(A), ZSCL_TRANSFER, atol=1e-9)
    np.testing.assert_allclose(last_per_dataset(A), ZSCL_LAST, atol=1e-9)
    # the last column has no free rows: its Average follows from Transfer and Last and matches to rounding
    assert round1(average_per_dataset(A).tolist()) == ZSCL_AVERAGE
    assert round1(transfer(A)) == 68.1
    assert round1(average(A)) == 75.4
    assert round1(last(A)) == 83.6


def test_bwt_and_transfer_by_hand():
    A = np.array([[80.0, 30.0, 20.0], [70.0, 90.0, 25.0], [60.0, 85.0, 95.0]])
    assert bwt(A) == pytest.approx(((60 - 80) + (85 - 90)) / 2)
    assert transfer(A) == pytest.approx((30.0 + (20 + 25) / 2) / 2)
    assert average(A) == pytest.approx(np.mean([(80 + 70 + 60) / 3, (30 + 90 + 85) / 3, (20 + 25 + 95) / 3]))
    assert last(A) == pytest.approx((60 + 85 + 95) / 3)
    assert plasticity(A) == pytest.approx((80 + 90 + 95) / 3)
    assert set(matrix_metrics(A)) == {"transfer", "average", "last", "bwt", "plasticity"}


def test_single_task_matrix():
    A = [[50.0]]
    assert math.isnan(transfer(A)) and math.isnan(bwt(A))
    assert last(A) == 50.0 and average(A) == 50.0


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros((0, 0)), [[1.0, np.nan], [1.0, 2.0]]])
def test_matrix_errors(bad):
    with pytest.raises(ValueError):
        matrix_metrics(bad)


def test_accuracy_matrix_rows():
    m = AccuracyMatrix(["a", "b"])
    assert not m.complete
    m.set_row(0, {"a": 10.0, "b": 20.0})
    with pytest.raises(KeyError, match="b"):
        m.set_row(1, {"a": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        m.set_row(1, [1.0, float("nan")])
    m.set_row(1, [30.0, 40.0])
    assert m.complete and m.metrics()["last"] == 35.0
    with pytest.raises(ValueError, match="unique"):
        AccuracyMatrix(["a", "a"])


def test_accuracy_and_per_class():
    preds = np.array([0, 1, 1, 2])
    labels = np.array([0, 1, 2, 2])
    assert accuracy(preds, labels) == 75.0
    logits = np.eye(3)[preds]
    assert accuracy(logits, labels) == 75.0
    pc = per_class_accuracy(preds, labels, 4)
    assert pc[:3] == [100.0, 100.0, 50.0] and math.isnan(pc[3])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError, match="shape"):
        accuracy([0, 1], [0])


def test_harmonic_mean_published_rows():
    # MergeTune table (ViT-B/16 base-to-novel averages): CLIP and CoOp rows
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70
    assert round(harmonic_mean(82.69, 63.22), 2) == 71.66
    assert round(harmonic_mean(80.82, 73.97), 2) == 77.24
    assert harmonic_mean(0.0, 0.0) == 0.0
    row = base_novel_summary([80.0, 60.0], [40.0, 20.0])
    assert row["base"] == 70.0 and row["novel"] == 30.0 and row["hm"] == pytest.approx(42.0)
    assert isinstance(harmonic_mean(70.0, 30.0), float) and harmonic_mean(70.0, 30.0) == pytest.approx(42.0)


def test_base_novel_hm_is_a_deprecated_alias_of_base_novel_summary():
    with pytest.warns(FutureWarning, match="base_novel_summary") as caught:
        row = base_novel_hm(80.0, 40.0)
    assert row == base_novel_summary(80.0, 40.0)
    assert caught[0].filename == __file__  # the warning points at the caller's line, not at hf_cft


def test_accuracy_matrix_to_dict_carries_names_values_and_metrics_only_when_complete():
    """to_dict: the names, the values as nested lists (NaN for rows not filled yet) and the metrics once every row
    is filled (None before)."""
    m = AccuracyMatrix(["a", "b"])
    m.set_row(0, [80.0, 10.0])
    partial = m.to_dict()
    assert partial["names"] == ["a", "b"] and partial["metrics"] is None
    assert partial["values"][0] == [80.0, 10.0] and all(np.isnan(v) for v in partial["values"][1])
    m.set_row(1, {"b": 70.0, "a": 60.0})
    full = m.to_dict()
    assert full == {"names": ["a", "b"], "values": [[80.0, 10.0], [60.0, 70.0]], "metrics": m.metrics()}
    assert isinstance(full["names"], list) and isinstance(full["values"], list)


def test_continual_metrics_refusals_exact_messages_and_small_matrices():
    """Exact messages for a non-square or empty matrix, missing rows, an empty name list, a name/matrix mismatch,
    a short row, a row without every dataset and an empty accuracy; one dataset is a valid matrix; BWT is defined
    from two tasks on; Transfer of one task is NaN without a numpy warning; a float32 matrix is computed in
    float64; round1 gives floats."""
    import warnings

    from hf_cft.metrics.continual import round1

    with pytest.raises(ValueError, match=r"^an accuracy matrix must be square T×T with T ≥ 1, got shape \(2, 3\)$"):
        transfer(np.zeros((2, 3)))
    with pytest.raises(
        ValueError, match=r"^the accuracy matrix has missing \(NaN\) or infinite entries in the rows used$"
    ):
        average(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"^an accuracy matrix needs at least one dataset$"):
        AccuracyMatrix([])
    assert AccuracyMatrix(["a"]).values.shape == (1, 1)
    with pytest.raises(ValueError, match=r"^3 names for a 2×2 matrix$"):
        AccuracyMatrix(["a", "b", "c"], np.zeros((2, 2)))
    m = AccuracyMatrix(["a", "b"])
    with pytest.raises(ValueError, match=r"^row 0 has 3 values for 2 datasets$"):
        m.set_row(0, [1.0, 2.0, 3.0])
    with pytest.raises(KeyError, match=r"row 1 lacks accuracies for \['b'\]"):
        m.set_row(1, {"a": 1.0})
    with pytest.raises(ValueError, match=r"^accuracy of an empty set is undefined$"):
        accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    assert bwt(np.array([[80.0, 10.0], [60.0, 70.0]])) == pytest.approx(-20.0)  # T = 2: defined
    assert math.isnan(bwt(np.array([[80.0]])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(transfer(np.array([[80.0]])))
    m32 = np.array([[70.1, 33.3, 41.7], [65.2, 80.9, 44.4], [60.3, 75.5, 90.7]], dtype=np.float32)
    m64 = m32.astype(np.float64)
    for metric in (transfer, average, last, bwt):
        assert metric(m32) == metric(m64), metric.__name__
    assert [type(v) for v in round1(np.array([1, 2]))] == [float, float] and round1([1.25, 2.0]) == [1.2, 2.0]
