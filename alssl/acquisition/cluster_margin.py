"""Cluster-Margin (Citovsky, DeSalvo, Gentile, Karydas, Rajagopalan, Rostamizadeh & Kumar 2021, "Batch Active
Learning at Scale", NeurIPS 2021, arXiv 2107.14263), Algorithm 1.

1. Once per feature set: hierarchical agglomerative clustering (HAC) of the pool with average linkage, cut into
   clusters; stored (`ctx.cache_dir/<sha16 of the embeddings>.cluster-margin.npz`, and in this process) and
   reused by every later query.
2. Each query: the k_m = `cluster_margin_candidates` × B (default 10 × B) unlabeled points with the smallest
   margin p(top-1) − p(top-2) of the probe (`--probe`, as `margin`) are the candidates; group them by cluster,
   sort those groups by their size (number of candidates in the cluster), smallest first, and take one random
   candidate from each group in that order, round after round (exhausted groups drop out), until B are picked.

Where this differs from the paper, and why: the paper cuts the dendrogram at a distance ε; alssl cuts it into a
number of clusters (`cluster_margin_clusters`, default pool size / 20, between 2 and MAX_CLUSTERS = 1000): the
same tree, a knob that does not depend on the scale of the features. Average-linkage HAC needs all pairwise
distances (O(N²)); the paper ran a distributed HAC on ~10M images. On a pool of more than HAC_POINTS = 2,000
points alssl clusters the pool into HAC_POINTS k-means micro-clusters first (faiss, 20 Lloyd iterations on up to
64 points per centroid, seed 0) and runs the average-linkage HAC on their centroids; every point takes its
micro-cluster's cluster. Pools of at most 2,000 points are clustered point by point, exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alssl.acquisition.base import (AcquisitionContext, feature_chunks, features_digest, features_of, lowest, option,
                                    require_labels)
from alssl.acquisition.uncertainty import _probe, _scores, top2_gap
from alssl.errors import UserError

CANDIDATES_PER_PICK = 10  # k_m = 10 × B
POINTS_PER_CLUSTER = 20  # default number of clusters: pool size / 20
MAX_CLUSTERS = 1000
HAC_POINTS = 2000  # above: average-linkage HAC over this many k-means micro-clusters
MICRO_POINTS_PER_CENTROID = 64
MICRO_SEED = 0
_CLUSTERS: dict[tuple[str, int], np.ndarray] = {}  # (features digest, n_clusters) -> [N] cluster ids, this process


def default_clusters(n: int) -> int:
    return int(np.clip(n // POINTS_PER_CLUSTER, 2, MAX_CLUSTERS))


def average_linkage(x: np.ndarray, n_clusters: int) -> np.ndarray:
    """[n] int64 cluster ids (0-based) of an average-linkage HAC of the rows of x (L2), cut into n_clusters."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(x) <= n_clusters:
        return np.arange(len(x))
    tree = linkage(np.asarray(x, np.float64), method="average", metric="euclidean")
    return fcluster(tree, t=n_clusters, criterion="maxclust").astype(np.int64) - 1


def hac_clusters(ctx: AcquisitionContext, n_clusters: int) -> np.ndarray:
    """[N] int64 cluster of every pool point: HAC on the points (N ≤ HAC_POINTS) or on k-means micro-clusters."""
    import faiss

    n, d = ctx.embeddings.shape
    if n <= HAC_POINTS:
        return average_linkage(features_of(ctx, np.arange(n)), n_clusters)
    rng = np.random.default_rng(MICRO_SEED)
    n_train = min(n, MICRO_POINTS_PER_CENTROID * HAC_POINTS)
    train = features_of(ctx, np.sort(rng.choice(n, n_train, replace=False)))
    km = faiss.Kmeans(d, HAC_POINTS, niter=20, seed=MICRO_SEED, max_points_per_centroid=MICRO_POINTS_PER_CENTROID,
                      min_points_per_centroid=1,  # small pools: few points per micro-cluster is the point
                      gpu=hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0, verbose=False)
    km.train(np.ascontiguousarray(train))
    micro = np.empty(n, np.int64)
    for idx, block in feature_chunks(ctx):
        micro[idx] = km.index.search(block, 1)[1][:, 0]
    used = np.unique(micro)  # empty micro-clusters take no part in the HAC
    of_micro = np.zeros(HAC_POINTS, np.int64)
    of_micro[used] = average_linkage(km.centroids[used], n_clusters)
    return of_micro[micro]


def pool_clusters(ctx: AcquisitionContext, n_clusters: int) -> tuple[np.ndarray, str]:
    """([N] cluster ids, "cached" | "computed"): the HAC clusters of this feature set, computed once."""
    from alssl.runs import atomic_write_bytes

    digest = features_digest(ctx.embeddings)
    key = (digest, n_clusters)
    if key in _CLUSTERS:
        return _CLUSTERS[key], "cached"
    path = None if ctx.cache_dir is None else Path(ctx.cache_dir) / f"{digest}.cluster-margin-{n_clusters}.npy"
    if path is not None and path.exists():
        _CLUSTERS[key] = np.load(path)
        return _CLUSTERS[key], "cached"
    clusters = hac_clusters(ctx, n_clusters)
    if path is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, clusters)
        atomic_write_bytes(path, buf.getvalue())
    _CLUSTERS[key] = clusters
    return clusters, "computed"


def round_robin(candidates: np.ndarray, clusters: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B of the candidates: one random member from each cluster group, smallest group first, round after round."""
    group = clusters[candidates]  # [k_m]
    names, sizes = np.unique(group, return_counts=True)
    order = np.lexsort((rng.random(len(names)), sizes))  # smallest first, equal sizes in random order
    position = np.empty(len(names), np.int64)
    position[order] = np.arange(len(names))
    slot = position[np.searchsorted(names, group)]  # [k_m] the group's place in the visiting order
    shuffled = rng.permutation(len(candidates))
    rank = np.empty(len(candidates), np.int64)  # [k_m] the round in which each candidate is taken
    by_group = shuffled[np.argsort(slot[shuffled], kind="stable")]  # shuffled within each group
    starts = np.searchsorted(slot[by_group], np.arange(len(names)))
    rank[by_group] = np.arange(len(candidates)) - starts[slot[by_group]]
    take = np.lexsort((slot, rank))[:budget]  # round by round, groups in size order
    return candidates[take].astype(np.int64)


def cluster_margin_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices: round-robin over HAC clusters of the k_m lowest-margin points (Citovsky et al. 2021)."""
    require_labels(ctx, "cluster-margin")
    per_pick = option(ctx, "cluster_margin_candidates", CANDIDATES_PER_PICK, float)
    n_clusters = option(ctx, "cluster_margin_clusters", default_clusters(len(ctx.embeddings)), int)
    if per_pick < 1 or n_clusters < 1:
        raise UserError(f"cluster_margin_candidates must be ≥ 1 and cluster_margin_clusters ≥ 1 (got {per_pick:g}, "
                        f"{n_clusters}); the defaults are {CANDIDATES_PER_PICK} and pool size / {POINTS_PER_CLUSTER}")
    clusters, source = pool_clusters(ctx, n_clusters)
    model, cand = _probe(ctx, ctx.probe, rng), ctx.unlabeled_indices
    gap = _scores(ctx, lambda x: top2_gap(model.predict_proba(x)), cand)  # [U]
    k_m = min(len(cand), max(budget, int(round(per_pick * budget))))
    candidates = lowest(gap, cand, k_m, rng)
    ctx.info.update(clusters=int(len(np.unique(clusters))), clusters_source=source, candidates=int(k_m))
    return round_robin(candidates, clusters, budget, rng)
