"""TypiClust, TPC_RP variant (Hacohen, Dekel & Weinshall 2022, "Active Learning on a Budget: Opposite
Strategies Suit High and Low Budgets", arXiv 2202.02794).

On L2-normalised embeddings (as the official code loads its self-supervised features):
1. k-means into K = min(|L| + B, max_clusters=500) clusters, as the official code: k-means++ with 10 restarts for
   K ≤ 50, MiniBatchKMeans (batch 5000, 3 restarts) above (`kmeans_assign`; seeded, so deterministic per seed);
2. B times: among clusters with more than 5 points (MIN_CLUSTER_SIZE) that still hold an unlabeled point, take
   the one with the fewest labeled-or-selected points, ties broken by the largest size; pick its most *typical*
   unlabeled point, typicality(x) = 1 / (mean L2 distance to its k nearest neighbours + 1e-5) computed among the
   cluster's unlabeled points with k = min(20, n_cluster_unlabeled // 2) (faiss exact kNN).
Typicality uses the mean L2 distance, as the paper writes it; the official code averages faiss's SQUARED L2
distances, which can order points differently. The cluster order is re-evaluated after every pick, so once every cluster holds a sample the next round of picks
again starts from the least covered, largest clusters (the paper's rule; the official code cycles once through
the initial order, which gives the same picks until every cluster is covered).
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, faiss_index, l2_normalise, option

MIN_CLUSTER_SIZE = 5
MAX_CLUSTERS = 500
K_NN = 20
KMEANS_MAX_K = 50  # official threshold between KMeans (n_init 10) and MiniBatchKMeans


def kmeans_assign(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[N] int64 cluster id of every row of x, clustered as the official TypiClust code (`pycls/al/typiclust.py`
    `kmeans`, run with scikit-learn 1.0.2): k ≤ 50 → KMeans, k-means++ with n_init = 10 restarts (the lowest inertia
    wins); above → MiniBatchKMeans(batch_size=5000), k-means++ with n_init = 3 (1.0.2's default; pinned here because
    newer scikit-learn defaults to 1). Deterministic for a seed (the official code leaves random_state unset)."""
    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    if k <= KMEANS_MAX_K:
        km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=3, batch_size=5000, random_state=seed)
    with warnings.catch_warnings():  # duplicates: fewer distinct points than k is fine here (empty clusters)
        warnings.simplefilter("ignore", ConvergenceWarning)
        return km.fit_predict(np.asarray(x, dtype=np.float32)).astype(np.int64)


def typicality(x: np.ndarray, k: int) -> np.ndarray:
    """[n] 1 / (mean L2 distance to the k nearest other rows + 1e-5)."""
    if len(x) < 2 or k < 1:
        return np.ones(len(x))
    index = faiss_index(x.shape[1])
    index.add(x)
    dist, _ = index.search(x, k + 1)  # [n, k+1] squared L2; column 0 is the point itself
    return 1.0 / (np.sqrt(np.maximum(dist[:, 1:], 0.0)).mean(1) + 1e-5)


def typiclust_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices: the most typical point of each of the largest uncovered clusters."""
    x = l2_normalise(ctx.embeddings)  # [N, D]
    max_clusters = option(ctx, "typiclust_max_clusters", MAX_CLUSTERS, int)
    knn = option(ctx, "typiclust_knn", K_NN, int)
    k = max(1, min(int(ctx.labeled.sum()) + budget, max_clusters, len(x)))
    assign = kmeans_assign(x, k, seed=int(rng.integers(2**31 - 1)))  # [N]
    sizes = np.bincount(assign, minlength=k)  # [K]
    covered = np.bincount(assign[ctx.labeled], minlength=k)  # [K] labeled or selected per cluster
    free = np.bincount(assign[~ctx.labeled], minlength=k)  # [K] unlabeled, not yet selected
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    taken = ctx.labeled.copy()
    picked: list[int] = []
    for _ in range(budget):
        ok = (sizes > MIN_CLUSTER_SIZE) & (free > 0)
        if not ok.any():
            ok = free > 0  # only small clusters are left
        cand = np.flatnonzero(ok)
        c = cand[np.lexsort((-sizes[cand], covered[cand]))[0]]  # fewest covered, then largest
        members = order[starts[c] : starts[c + 1]]
        members = members[~taken[members]]  # the cluster's unlabeled points
        best = members[int(np.argmax(typicality(x[members], min(knn, len(members) // 2))))]
        picked.append(int(best))
        taken[best] = True
        covered[c] += 1
        free[c] -= 1
    return np.asarray(picked, dtype=np.int64)
