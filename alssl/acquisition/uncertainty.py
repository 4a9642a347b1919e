"""Uncertainty sampling with a probe on frozen features (Bengar et al. 2021, arXiv 2108.11458).

- `entropy`: max predictive entropy H(p) = -Σ p log p (Shannon 1948; the classic AL baseline, Settles 2009).
- `margin`: smallest p(top-1) − p(top-2) (Scheffer et al. 2001).
- `svm-margin`: Bengar'21's SVM min-margin: smallest gap between the two largest one-vs-rest decision values of
  a (Linear)SVC, i.e. the point closest to a decision boundary between its two most likely classes.

`entropy`/`margin` use the probe named by `ctx.probe` (linear: logistic regression; svm: softmax of SVM decision
values); `svm-margin` always uses the SVM (kernel from `ctx.options["kernel"]`, default linear).
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, feature_chunks, features_of, lowest, option, require_labels
from alssl.probes import Probe, fit_probe


def _probe(ctx: AcquisitionContext, kind: str, rng: np.random.Generator) -> Probe:
    idx = np.flatnonzero(ctx.labeled)
    return fit_probe(kind, features_of(ctx, idx), ctx.labels[idx], num_classes=ctx.num_classes,
                     kernel=option(ctx, "kernel", "linear", str), seed=int(rng.integers(2**31 - 1)))


def _scores(ctx: AcquisitionContext, score_fn, candidates: np.ndarray) -> np.ndarray:
    """score_fn over the candidates' embeddings, chunk by chunk (no copy of the whole pool)."""
    out = [score_fn(block) for _, block in feature_chunks(ctx, candidates)]
    return np.concatenate(out) if out else np.zeros(0)


def entropy_scores(p: np.ndarray) -> np.ndarray:
    """[N, C] probabilities -> [N] Shannon entropy (0 log 0 = 0)."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(1)


def top2_gap(v: np.ndarray) -> np.ndarray:
    """[N, C] scores -> [N] largest minus second largest."""
    part = np.partition(v, -2, axis=1)  # [N, C], last two columns are the top two
    return part[:, -1] - part[:, -2]


def entropy(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The B unlabeled samples with the highest predictive entropy."""
    require_labels(ctx, "entropy")
    model, cand = _probe(ctx, ctx.probe, rng), ctx.unlabeled_indices
    h = _scores(ctx, lambda x: entropy_scores(model.predict_proba(x)), cand)  # [U]
    return lowest(-h, cand, budget, rng)


def margin(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The B unlabeled samples with the smallest top-1 minus top-2 probability."""
    require_labels(ctx, "margin")
    model, cand = _probe(ctx, ctx.probe, rng), ctx.unlabeled_indices
    gap = _scores(ctx, lambda x: top2_gap(model.predict_proba(x)), cand)  # [U]
    return lowest(gap, cand, budget, rng)


def svm_margin(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The B unlabeled samples nearest an SVM decision boundary (smallest gap of the top-2 decision values)."""
    require_labels(ctx, "svm-margin")
    model, cand = _probe(ctx, "svm", rng), ctx.unlabeled_indices
    gap = _scores(ctx, lambda x: top2_gap(model.decision_function(x)), cand)  # [U]
    return lowest(gap, cand, budget, rng)
