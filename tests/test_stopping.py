"""The stopping signal (alssl/stopping.py): Cohen's κ by hand, the rule on a digits curve, and the CLI lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alssl.data import load_dataset
from alssl.probes import fit_probe
from alssl.stopping import WINDOW, cohen_kappa, stopping_signal


def test_cohen_kappa_by_hand():
    # agreement 3/4; marginals (2, 2) and (1, 3): chance agreement (2·1 + 2·3) / 16 = 0.5 -> κ = (0.75 − 0.5) / 0.5
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx(0.5)
    assert cohen_kappa([2, 0, 1], [2, 0, 1], 3) == 1.0 and cohen_kappa([1, 1], [1, 1], 3) == 1.0
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0], 2) == pytest.approx(-1.0)


def test_the_signal_fires_where_the_digits_curve_flattens():
    """25 rounds of 20 random labels on digits pixels: κ of consecutive rounds rises to ~0.99; the rule (mean of
    the last 3 above 0.99) fires after round 15 for this seed, when the test accuracy has gained ~44 points and
    gains ~1 more by round 24; on the first 6 rounds (accuracy still climbing) it stays silent."""
    d = load_dataset("digits")
    x = d.x_train.reshape(len(d.x_train), -1).astype(np.float32)
    xt = d.x_test.reshape(len(d.x_test), -1).astype(np.float32)
    order = np.random.default_rng(2).permutation(len(x))
    labeled_round = np.full(len(x), -1)
    acc = []
    for k in range(25):
        labeled_round[order[20 * k : 20 * (k + 1)]] = k
        idx = np.flatnonzero(labeled_round >= 0)
        acc.append(fit_probe("linear", x[idx], d.y_train[idx], num_classes=10).accuracy(xt, d.y_test))
    sig = stopping_signal(x, labeled_round, d.y_train, num_classes=10, cv_rounds=2)
    kappa = sig["kappa"]
    fires = next(r for r in range(WINDOW, len(kappa) + 1) if np.mean(kappa[r - WINDOW : r]) > 0.99)  # after round r
    assert sig["stable"] and "predictions stable" in sig["message"]
    assert acc[fires] - acc[0] > 0.3  # the curve climbed before the signal
    assert acc[-1] - acc[fires] < 0.02  # and is flat after it
    assert [k for k, _ in sig["cv_accuracy"]] == [23, 24] and all(0.8 < a <= 1 for _, a in sig["cv_accuracy"])
    early = labeled_round.copy()
    early[early >= 6] = -1
    assert not stopping_signal(x, early, d.y_train, num_classes=10, cv_rounds=0)["stable"]


def test_probe_and_status_say_when_predictions_are_stable(tmp_path, monkeypatch):
    import alssl.stopping
    from conftest import run_cli_inprocess as cli

    run = tmp_path / "run"
    assert cli("pretrain", "--data", "digits", "--out", str(run), "--epochs", "0", "-q").returncode == 0
    for _ in range(2):
        assert cli("query", str(run), "--budget", "30", "--strategy", "random").returncode == 0
        assert cli("label", str(run), "--oracle").returncode == 0
    r = cli("probe", str(run))
    record = json.loads(r.stdout)
    assert len(record["kappa"]) == 1 and record["predictions_stable"] is False and "stable" not in r.stderr
    monkeypatch.setattr(alssl.stopping, "WINDOW", 1)  # a rule that fires after 2 rounds, to see the lines
    monkeypatch.setattr(alssl.stopping, "THRESHOLD", -1.0)
    r = cli("probe", str(run))
    assert json.loads(r.stdout)["predictions_stable"] is True
    assert "predictions stable (κ = " in r.stderr and "more labels of this kind buy little" in r.stderr
    assert "predictions stable" in cli("status", str(run)).stdout
