"""Stage 2 probes: accuracy floors on digits, the num_classes contract, and the bad-input messages."""

from __future__ import annotations

import numpy as np
import pytest

from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.probes import MISSING, PROBES, fit_probe, probe_accuracy


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    return flat(d.x_train), d.y_train, flat(d.x_test), d.y_test


def _ten_percent(y: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(y), size=len(y) // 10, replace=False)


@pytest.mark.parametrize("kind,kernel,floor", [("linear", "linear", 0.87), ("svm", "linear", 0.82),
                                               ("svm", "rbf", 0.84)])
def test_probe_accuracy_on_digits_with_ten_percent_labels(digits, kind, kernel, floor):
    xtr, ytr, xte, yte = digits
    idx = _ten_percent(ytr)
    acc = probe_accuracy(kind, xtr[idx], ytr[idx], xte, yte, num_classes=10, kernel=kernel)
    assert acc >= floor, f"{kind}/{kernel} probe: {acc:.3f} < {floor}"
    model = fit_probe(kind, xtr[idx], ytr[idx], num_classes=10, kernel=kernel)
    assert model.accuracy(xte, yte) == pytest.approx(acc)
    pred = model.predict(xte)
    assert pred.dtype == np.int64 and pred.shape == (len(xte),)
    proba = model.predict_proba(xte)
    assert proba.shape == (len(xte), 10) and np.allclose(proba.sum(1), 1.0)
    assert np.array_equal(proba.argmax(1), pred) and np.array_equal(model.decision_function(xte).argmax(1), pred)


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_missing_classes_get_zero_probability_and_large_negative_decision(digits, kind):
    xtr, ytr, xte, _ = digits
    idx = np.flatnonzero(np.isin(ytr, [0, 3, 7]))[:60]
    model = fit_probe(kind, xtr[idx], ytr[idx], num_classes=10)
    proba, dec = model.predict_proba(xte), model.decision_function(xte)
    assert proba.shape == dec.shape == (len(xte), 10)
    absent = [c for c in range(10) if c not in (0, 3, 7)]
    assert np.all(proba[:, absent] == 0.0) and np.allclose(proba.sum(1), 1.0)
    assert np.all(dec[:, absent] == MISSING)
    assert set(np.unique(model.predict(xte))) <= {0, 3, 7}


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_two_classes_give_two_meaningful_columns(kind):
    x = np.array([[-2.0, 0], [-1, 1], [-1.5, -1], [2, 0], [1, 1], [1.5, -1]], np.float32)
    y = np.array([1, 1, 1, 4, 4, 4])
    model = fit_probe(kind, x, y, num_classes=5)
    q = np.array([[-3.0, 0], [3, 0]], np.float32)
    assert model.predict(q).tolist() == [1, 4]
    dec = model.decision_function(q)
    assert dec[0, 1] > dec[0, 4] and dec[1, 4] > dec[1, 1]
    assert model.predict_proba(q)[0, 1] > 0.5 and model.predict_proba(q)[1, 4] > 0.5


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_single_class_predicts_that_class(kind):
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    model = fit_probe(kind, x, np.full(4, 2), num_classes=3)
    q = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    assert model.predict(q).tolist() == [2] * 5
    assert np.array_equal(model.predict_proba(q), np.tile([0.0, 0.0, 1.0], (5, 1)))
    assert model.accuracy(q, np.array([2, 2, 2, 0, 1])) == pytest.approx(0.6)


def test_empty_labeled_set_names_the_fix():
    with pytest.raises(UserError,
                       match=r"no labeled samples yet; run `alssl query RUN --budget \.\.\. --strategy random`"):
        fit_probe("linear", np.zeros((0, 4), np.float32), np.zeros(0, np.int64), num_classes=3)


def test_bad_probe_inputs_are_user_errors():
    x, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    with pytest.raises(UserError, match='unknown probe "lineer" \\(did you mean "linear"\\?\\)'):
        fit_probe("lineer", x, y, num_classes=2)
    with pytest.raises(UserError, match='unknown kernel "rbff"'):
        fit_probe("svm", x, y, num_classes=2, kernel="rbff")
    with pytest.raises(UserError, match="labels must lie in 0..1"):
        fit_probe("linear", x, np.array([0, 2]), num_classes=2)
    with pytest.raises(UserError, match="2 feature rows but 3 labels"):
        fit_probe("linear", x, np.array([0, 1, 1]), num_classes=2)
