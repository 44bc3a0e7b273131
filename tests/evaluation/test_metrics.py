import numpy as np
import pytest

from bincounter.evaluation.metrics import evaluate_predictions, reliability


def one_hot(pred, k):
    p = np.full((len(pred), k), 0.0)
    p[np.arange(len(pred)), pred] = 1.0
    return p


def test_metrics_match_hand_computed_values():
    # true counts 0,1,2,3 ; predicted 0,2,2,5 -> errors 0,1,0,2
    y = np.array([0, 1, 2, 3])
    probs = one_hot([0, 2, 2, 5], 6)
    m = evaluate_predictions(y, probs, min_count=0, class_names=[str(i) for i in range(6)])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 1 + 0 + 4) / 4))
    assert m["within_1"] == pytest.approx(0.75)
    # class 2: predicted twice, right once -> precision 0.5, recall 1, F1 2/3
    assert m["per_class"]["2"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["2"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["2"]["f1"] == pytest.approx(2 / 3)
    # macro-F1 over classes present in the truth (0,1,2,3): F1 = 1, 0, 2/3, 0
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3 + 0) / 4)
    assert m["confusion_matrix"][1][2] == 1 and m["confusion_matrix"][3][5] == 1


def test_range_metrics_keep_counts_0_to_5_only():
    names = [str(i) for i in range(6)] + ["6+"]
    y = np.array([0, 6, 6])  # two photos in the overflow class
    probs = one_hot([0, 0, 6], 7)
    m = evaluate_predictions(y, probs, min_count=0, class_names=names)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["range_n"] == 1 and m["range_accuracy"] == 1.0


def test_min_count_shifts_values_for_rmse():
    # classes 1..5; true 1 predicted 3 -> error 2 regardless of the offset
    m = evaluate_predictions(np.array([0]), one_hot([2], 5), min_count=1, class_names=list("12345"))
    assert m["rmse"] == pytest.approx(2.0)


def test_expected_calibration_error():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # 90% sure, 50% right
    assert reliability(y, probs)["ece"] == pytest.approx(0.4)
