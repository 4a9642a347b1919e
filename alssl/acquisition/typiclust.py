"""TypiClust, TPC_RP variant (Hacohen, Dekel & Weinshall 2022, "Active Learning on a Budget: Opposite
Strategies Suit High and Low Budgets", arXiv 2202.02794).

On L2-normalised embeddings (as the official code loads its self-supervised features):
1. k-means (faiss, seeded) into K = min(|L| + B, max_clusters=500) clusters;
2. B times: among clusters with more than 5 points (MIN_CLUSTER_SIZE) that still hold an unlabeled point, take
   the one with the fewest labeled-or-selected points, ties broken by the largest size; pick its most *typical*
   unlabeled point, typicality(x) = 1 / (mean L2 distance to its k nearest neighbours + 1e-5) computed among the
   cluster's unlabeled points with k = min(20, n_cluster_unlabeled // 2) (faiss exact kNN).
The cluster order is re-evaluated after every pick, so once every cluster holds a sample the next round of picks
again starts from the least covered, largest clusters (the paper's rule; the official code cycles once through
the initial order, which gives the same picks until every cluster is covered).
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, faiss_index, l2_normalise, option

MIN_CLUSTER_SIZE = 5
MAX_CLUSTERS = 500
K_NN = 20


def kmeans_assign(x: np.ndarray, k: int, seed: int, niter: int = 25) -> np.ndarray:
    """[N] int64 cluster id of every row of x, from faiss k-means with k clusters (seeded, exact assignment)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 20, gpu=bool(getattr(faiss, "get_num_gpus", lambda: 0)() > 0))
    km.train(x)
    _, assign = km.index.search(x, 1)  # [N, 1]
    return assign[:, 0].astype(np.int64)


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
