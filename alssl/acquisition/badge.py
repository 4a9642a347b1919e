"""BADGE (Ash, Zhang, Krishnamurthy, Langford & Agarwal 2020, "Deep Batch Active Learning by Diverse, Uncertain
Gradient Lower Bounds", ICLR 2020, arXiv 1906.03671; official code JordanAsh/badge).

The gradient embedding of an unlabeled point is the gradient of the cross-entropy loss with respect to the last
layer's weights, taken at the model's own predicted label ŷ: g(x) = (p(x) − e_ŷ) ⊗ z(x) ∈ R^{K·D} (the official
code stores its negative; distances are the same), with z the layer's input. Here the last layer is the linear
probe (`fit_probe("linear")`, logistic regression on standardised features), so z = (x − μ) / σ. BADGE picks the
batch by k-means++ seeding over the unlabeled points' gradient embeddings, as the official `init_centers`: the
first pick is the embedding with the largest norm, every next pick is drawn with probability proportional to its
squared distance to the nearest pick so far. The labeled set enters only through the probe.

Scale: g is never materialised (N × K × D floats would be 20 GB at N = 1M, D = 512, K = 10). Its inner products
factorise, g_i·g_j = (a_i·a_j)(z_i·z_j) with a = p − e_ŷ, so each pick is one streaming pass over the features
(z_i·z_c = x_i·(z_c / σ) − μ·(z_c / σ)) plus O(N·K) work: the cost of a k-center step, in O(N·K) memory, without
subsampling. Draws: one uniform number per pick, mapped through the cumulative distribution (the official code
draws with scipy's rv_discrete). When every remaining point coincides with a pick (all distances 0; the official
code stops in the debugger there), the rest of the budget is random, with a warning.
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, feature_chunks, features_of, fill_random, require_labels
from alssl.probes import Probe, fit_probe


def probe_parts(probe: Probe, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a = p − e_ŷ [n, C] float64, z = standardised x [n, D] float64) for a block of features."""
    p = probe.predict_proba(x)  # [n, C]
    a = p.copy()
    a[np.arange(len(p)), p.argmax(1)] -= 1.0
    z = np.asarray(x, np.float64) if probe.scaler is None else probe.scaler.transform(np.asarray(x, np.float64))
    return a, z


def gradient_embedding(probe: Probe, x: np.ndarray) -> np.ndarray:
    """[n, C·D] the materialised gradient embeddings, class blocks side by side (small n only: tests, references)."""
    a, z = probe_parts(probe, x)
    return (a[:, :, None] * z[:, None, :]).reshape(len(x), -1)


def badge_picks(ctx: AcquisitionContext, probe: Probe, candidates: np.ndarray, budget: int,
                rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding over the gradient embeddings of `candidates` (absolute indices), B picks."""
    n = len(ctx.embeddings)
    a = np.zeros((n, probe.num_classes))  # [N, C]
    zz = np.zeros(n)  # [N] ||z||²
    for idx, block in feature_chunks(ctx):
        a_blk, z_blk = probe_parts(probe, block)
        a[idx], zz[idx] = a_blk, np.einsum("ij,ij->i", z_blk, z_blk)
    g2 = np.einsum("ij,ij->i", a, a) * zz  # [N] ||g||²
    mu = np.zeros(ctx.embeddings.shape[1]) if probe.scaler is None else probe.scaler.mean_
    sigma = np.ones(ctx.embeddings.shape[1]) if probe.scaler is None else probe.scaler.scale_
    a_cand, g2_cand = a[candidates], g2[candidates]  # [U, C], [U]
    buf = np.empty(n, np.float32)

    def sq_dist_to(c: int) -> np.ndarray:
        """[U] squared distance of every candidate's g to g_c."""
        zc = probe_parts(probe, features_of(ctx, np.array([c])))[1][0]  # [D]
        w = (zc / sigma).astype(np.float32)
        for idx, block in feature_chunks(ctx):  # one streaming pass: x @ w
            np.matmul(block, w, out=buf[idx[0] : idx[-1] + 1])
        zdot = buf[candidates].astype(np.float64) - float(mu @ (zc / sigma))  # [U] z_i·z_c
        return np.maximum(g2_cand + g2[c] - 2.0 * (a_cand @ a[c]) * zdot, 0.0)

    first = int(np.argmax(g2_cand))
    chosen = [first]
    d2 = sq_dist_to(int(candidates[first]))  # [U] to the nearest pick
    d2[first] = 0.0
    while len(chosen) < budget:
        total = d2.sum()
        if not total > 0:
            break
        pick = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
        pick = min(pick, len(d2) - 1)
        if d2[pick] <= 0:  # rounding at the very top of the cumulative sum
            pick = int(np.flatnonzero(d2 > 0)[-1])
        chosen.append(pick)
        np.minimum(d2, sq_dist_to(int(candidates[pick])), out=d2)
        d2[pick] = 0.0
    picked = candidates[np.asarray(chosen)].tolist()
    return fill_random(picked, ctx, budget, rng, why="badge: every remaining gradient embedding equals a pick")


def badge_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices: k-means++ seeds of the linear probe's gradient embeddings (Ash et al. 2020)."""
    require_labels(ctx, "badge")
    idx = np.flatnonzero(ctx.labeled)
    probe = fit_probe("linear", features_of(ctx, idx), ctx.labels[idx], num_classes=ctx.num_classes,
                      seed=int(rng.integers(2**31 - 1)))
    return badge_picks(ctx, probe, ctx.unlabeled_indices, budget, rng)
