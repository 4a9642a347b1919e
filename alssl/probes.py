"""Stage 2: probes on frozen features (Bengar et al. 2021, arXiv 2108.11458, Sec. 3: linear and SVM probes).

A probe is fitted on the embeddings of the labeled set only and always answers with `num_classes` columns,
whatever classes the labeled set happens to hold:

- ``linear``: multinomial logistic regression (scikit-learn, lbfgs, C=1.0, max_iter=2000) on standardised
  features. `predict_proba` is the model's softmax; `decision_function` its logits.
- ``svm``: one-vs-rest LinearSVC (C=1.0) on standardised features, or ``kernel="rbf"`` → SVC(kernel="rbf",
  gamma="scale", decision_function_shape="ovr"). `decision_function` is the per-class decision value (signed
  distance to the class's hyperplane, up to ||w||); `predict_proba` is the softmax of those values (a ranking
  score, not a calibrated probability).

Classes absent from the labeled set get probability 0 and decision value `MISSING` (-1e9). A labeled set with a
single class predicts that class everywhere (scikit-learn cannot fit one class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from alssl.errors import UserError, unknown

MISSING = -1e9  # decision value of a class the labeled set does not contain
KERNELS = ("linear", "rbf")
CHUNK = 16384  # rows per prediction chunk: keeps the standardised copy small on big pools


@dataclass
class Probe:
    """A fitted probe; every output has `num_classes` columns in the global class order."""

    kind: str
    num_classes: int
    classes: np.ndarray  # int64 [K] classes present in the labeled set, ascending
    scaler: StandardScaler | None
    model: Any | None  # None when the labeled set holds a single class

    def _raw(self, x: np.ndarray) -> np.ndarray:
        """Decision values for the present classes, [N, K]."""
        x = _as_features(x)
        if self.model is None:
            return np.zeros((len(x), 1), np.float64)
        out = []
        for i in range(0, len(x), CHUNK):
            d = self.model.decision_function(self.scaler.transform(x[i : i + CHUNK]))
            if d.ndim == 1:  # binary: one hyperplane for classes[1]
                d = np.stack([np.zeros_like(d), d], 1) if self.kind == "linear" else np.stack([-d, d], 1)
            out.append(d.astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """[N, num_classes] logits (linear) or one-vs-rest decision values (svm); absent classes = MISSING."""
        raw = self._raw(x)  # [N, K]
        full = np.full((len(raw), self.num_classes), MISSING, np.float64)
        full[:, self.classes] = raw
        return full

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """[N, num_classes] class probabilities (svm: softmax of the decision values); absent classes = 0."""
        raw = self._raw(x)  # [N, K]
        z = np.exp(raw - raw.max(1, keepdims=True))
        full = np.zeros((len(raw), self.num_classes), np.float64)
        full[:, self.classes] = z / z.sum(1, keepdims=True)
        return full

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N] int64 predicted class ids."""
        return self.classes[self._raw(x).argmax(1)].astype(np.int64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        y = np.asarray(y)
        if len(y) == 0:
            raise UserError("cannot measure accuracy on an empty test split; give a dataset with test samples")
        return float((self.predict(x) == y).mean())


def _as_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"probe features must be a 2-D array [N, D] (got shape {x.shape}); flatten images first")
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _fit_linear(x: np.ndarray, y: np.ndarray, *, kernel: str, seed: int) -> Any:
    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, y)


def _fit_svm(x: np.ndarray, y: np.ndarray, *, kernel: str, seed: int) -> Any:
    if kernel == "rbf":
        return SVC(kernel="rbf", C=1.0, gamma="scale", decision_function_shape="ovr", random_state=seed).fit(x, y)
    return LinearSVC(C=1.0, max_iter=10000, random_state=seed).fit(x, y)


PROBES: dict[str, Callable[..., Any]] = {"linear": _fit_linear, "svm": _fit_svm}


def fit_probe(kind: str, x: np.ndarray, y: np.ndarray, *, num_classes: int, kernel: str = "linear",
              seed: int = 0) -> Probe:
    """Fit probe `kind` ("linear" | "svm") on labeled features x [N, D] with labels y [N] in [0, num_classes).

    `kernel` ("linear" | "rbf") only changes the svm probe."""
    if kind not in PROBES:
        raise unknown("probe", kind, PROBES)
    if kernel not in KERNELS:
        raise unknown("kernel", kernel, KERNELS)
    x = _as_features(x)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(x) == 0:
        raise UserError("no labeled samples yet; "
                        "run `alssl query RUN --budget ... --strategy random` then `alssl label RUN ...`")
    if len(x) != len(y):
        raise UserError(f"probe got {len(x)} feature rows but {len(y)} labels; pass one label per row")
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"labels must lie in 0..{num_classes - 1} (got {y.min()}..{y.max()}); check the labeled set")
    classes = np.unique(y)
    if len(classes) == 1:
        return Probe(kind=kind, num_classes=num_classes, classes=classes, scaler=None, model=None)
    scaler = StandardScaler().fit(x)
    model = PROBES[kind](scaler.transform(x), y, kernel=kernel, seed=seed)
    return Probe(kind=kind, num_classes=num_classes, classes=model.classes_.astype(np.int64), scaler=scaler,
                 model=model)


def probe_accuracy(kind: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   num_classes: int, kernel: str = "linear", seed: int = 0) -> float:
    """Fit on (train_x, train_y), return accuracy on (test_x, test_y)."""
    return fit_probe(kind, train_x, train_y, num_classes=num_classes, kernel=kernel, seed=seed).accuracy(test_x, test_y)


def cross_val_accuracy(kind: str, x: np.ndarray, y: np.ndarray, *, num_classes: int, kernel: str = "linear",
                       seed: int = 0) -> tuple[float | None, int]:
    """Stratified k-fold accuracy of probe `kind` on the labeled set alone, k = min(5, smallest class count).

    What `alssl probe` reports when there is no labeled test set. Returns (accuracy, k); (None, k) when some class
    has a single label (k < 2: no fold could hold it out and still train on it)."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(np.int64)
    k = int(min(5, np.bincount(y).compress(np.bincount(y) > 0).min()))
    if k < 2 or len(np.unique(y)) < 2:
        return None, k
    correct = 0
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
        model = fit_probe(kind, x[tr], y[tr], num_classes=num_classes, kernel=kernel, seed=seed)
        correct += int((model.predict(x[te]) == y[te]).sum())
    return correct / len(y), k
