"""When to stop buying labels: the stabilizing-predictions signal (Bloodgood & Vijay-Shanker 2009, "A Method for
Stopping Active Learning Based on Stabilizing Predictions and the Need for User-Adjustable Stopping", CoNLL).

A fixed *stop set* of pool images (STOP_SET = 2,000, drawn once with seed 0; the whole pool when smaller) is
predicted by the probe fitted on the labels of rounds 0..k, for every round k. Cohen's κ between the predictions of
consecutive rounds measures how much the last labels changed the model; the paper's rule stops when the mean κ
of the last WINDOW = 3 pairs is above THRESHOLD = 0.99. Next to it, the cross-validated accuracy of the probe on
the labels of each of the last rounds (stratified k-fold on the labeled set only: no test labels are used) gives
the trend a person can check the signal against.
"""

from __future__ import annotations

import numpy as np

from alssl.probes import cross_val_accuracy, fit_probe

STOP_SET = 2000
STOP_SEED = 0
WINDOW = 3
THRESHOLD = 0.99


def cohen_kappa(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Cohen's κ of two label vectors: (p_o − p_e) / (1 − p_e); 1.0 when both are one and the same constant."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    p_o = float((a == b).mean())
    p_e = float((np.bincount(a, minlength=num_classes) * np.bincount(b, minlength=num_classes)).sum()) / len(a) ** 2
    return 1.0 if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def stable_message(kappa: list[float]) -> str:
    """The sentence `alssl probe` and `alssl status` print when the rule fires."""
    return (f"predictions stable (κ = {sum(kappa) / len(kappa):.3f} over the last {len(kappa)} rounds): "
            "more labels of this kind buy little")


def stop_rows(n: int) -> np.ndarray:
    """The stop set: STOP_SET pool rows drawn with STOP_SEED (all rows when the pool is smaller)."""
    if n <= STOP_SET:
        return np.arange(n)
    return np.sort(np.random.default_rng(STOP_SEED).choice(n, STOP_SET, replace=False))


def stopping_signal(features: np.ndarray, labeled_round: np.ndarray, labels: np.ndarray, *, num_classes: int,
                    probe: str = "linear", kernel: str = "linear", seed: int = 0, cv_rounds: int = WINDOW + 1) -> dict:
    """The signal after the last labeled round: {"kappa": [κ of rounds (k−1, k)], "stable": bool, "message": str
    or None, "cv_accuracy": [(round, accuracy or None)] for the last `cv_rounds` rounds}.

    `labeled_round[i]` = the round sample i was labeled in (−1: unlabeled), as `Run.labeled_round`."""
    rows = stop_rows(len(features))
    x_stop = np.asarray(features[rows], np.float32)
    rounds = sorted(int(r) for r in np.unique(labeled_round[labeled_round >= 0]))
    preds, cv = [], []
    for k in rounds:
        idx = np.flatnonzero((labeled_round >= 0) & (labeled_round <= k))
        x, y = np.asarray(features[idx], np.float32), labels[idx]
        preds.append(fit_probe(probe, x, y, num_classes=num_classes, kernel=kernel, seed=seed).predict(x_stop))
        if cv_rounds > 0 and k in rounds[-cv_rounds:]:
            acc, _ = cross_val_accuracy(probe, x, y, num_classes=num_classes, kernel=kernel, seed=seed)
            cv.append((k, None if acc is None else round(float(acc), 4)))
    kappa = [round(cohen_kappa(a, b, num_classes), 4) for a, b in zip(preds, preds[1:])]
    stable = len(kappa) >= WINDOW and float(np.mean(kappa[-WINDOW:])) > THRESHOLD
    message = stable_message(kappa[-WINDOW:]) if stable else None
    return {"kappa": kappa, "stable": stable, "message": message, "cv_accuracy": cv}
