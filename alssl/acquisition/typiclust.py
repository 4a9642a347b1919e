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
distances, which can order points differently. The cluster order is re-evaluated after every pick, so once every
cluster holds a sample the next round of picks
again starts from the least covered, largest clusters (the paper's rule; the official code cycles once through
the initial order, which gives the same picks until every cluster is covered).

At scale (issue 29): the clustering is the official scikit-learn one up to KMEANS_SKLEARN_MAX_N = 50,000 pool
points and faiss k-means above (`typiclust_kmeans` = auto | sklearn | faiss): Lloyd iterations on a seeded
subsample of 256 points per centroid (faiss's default), from greedy k-means++ seeds like scikit-learn's (faiss has
no k-means++), restarted as the official estimators (K ≤ 50: 10 full runs, the lowest objective wins; above: 3
seedings tried on a 15,000-point subset, the best run once, as MiniBatchKMeans' n_init=3), GPU when faiss
sees one; then every pool point is assigned to its nearest centroid, block by block. Everything after the
clustering is the same code for both backends, so the picks differ only where the two clusterings differ
(`tests/test_acquisition.py` checks equal picks on separated blobs). Cluster ids are renamed in the order of
their first member, so equal-size clusters are visited in the same order whichever k-means numbered them.
Features are read block by block through
`feature_chunks`; a cluster with more than MAX_TYPICALITY_POINTS unlabeled points computes typicality on a random
subsample of that many (a cluster that size only occurs with few clusters on a big pool; never at N ≤ 50k with
the default K cap).
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, faiss_index, feature_chunks, features_of, option
from alssl.errors import UserError

MIN_CLUSTER_SIZE = 5
MAX_CLUSTERS = 500
K_NN = 20
KMEANS_MAX_K = 50  # official threshold between KMeans (n_init 10) and MiniBatchKMeans
KMEANS_SKLEARN_MAX_N = 50_000  # above: faiss k-means
POINTS_PER_CENTROID = 256  # faiss k-means trains on at most this many points per centroid
INIT_SIZE = 15_000  # MiniBatchKMeans' default init_size (3 × batch_size 5000): the subset its seedings are tried on
MAX_TYPICALITY_POINTS = 20_000
BACKENDS = ("auto", "sklearn", "faiss")


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


def kmeans_backend(backend: str, n: int) -> str:
    """"sklearn" or "faiss" for a pool of n points ("auto": sklearn up to KMEANS_SKLEARN_MAX_N)."""
    if backend not in BACKENDS:
        raise UserError(f"typiclust_kmeans must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "sklearn" if n <= KMEANS_SKLEARN_MAX_N else "faiss"
    return backend


def kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[k, D] greedy k-means++ seeds (Arthur & Vassilvitskii 2007, with scikit-learn's 2 + ln k local trials per
    seed: the candidate that lowers the potential most wins)."""
    sq = np.einsum("ij,ij->i", x, x).astype(np.float64)  # [n]
    trials = 2 + int(np.log(k))

    def sq_dist(c: np.ndarray) -> np.ndarray:  # [t, n] squared distances to candidate rows c
        return np.maximum(sq[None] + sq[c][:, None] - 2.0 * (x[c] @ x.T), 0.0)

    centres = [int(rng.integers(len(x)))]
    closest = sq_dist(np.array(centres))[0]  # [n]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            cand = rng.integers(len(x), size=trials)
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=len(x) - 1)
        d = np.minimum(closest[None], sq_dist(cand))  # [t, n]
        best = int(np.argmin(d.sum(1)))
        centres.append(int(cand[best]))
        closest = d[best]
    return np.ascontiguousarray(x[centres], dtype=np.float32)


def faiss_kmeans(train: np.ndarray, k: int, seed: int):
    """A trained faiss.Kmeans (20 Lloyd iterations, GPU when faiss sees one) started from greedy k-means++ seeds,
    restarted as the official scikit-learn estimators: k ≤ 50 (KMeans, n_init=10) → 10 full runs, the lowest
    objective wins; k > 50 (MiniBatchKMeans, n_init=3) → 3 seedings on a random subset of max(15,000, 3k) points
    (its init_size), the one with the lowest inertia on that subset is run once."""
    import faiss

    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    train = np.ascontiguousarray(train, dtype=np.float32)
    rng = np.random.default_rng(seed)

    def run(init: np.ndarray):
        km = faiss.Kmeans(train.shape[1], k, niter=20, seed=int(rng.integers(2**31 - 1)), gpu=gpu,
                          max_points_per_centroid=POINTS_PER_CENTROID, min_points_per_centroid=1, verbose=False)
        km.train(train, init_centroids=init)
        return km

    if k <= KMEANS_MAX_K:
        return min((run(kmeanspp(train, k, rng)) for _ in range(10)), key=lambda km: km.obj[-1])
    sub = train[rng.choice(len(train), min(len(train), max(INIT_SIZE, 3 * k)), replace=False)]
    best, best_inertia = None, np.inf
    for _ in range(3):
        seeds = kmeanspp(sub, k, rng)
        index = faiss.IndexFlatL2(sub.shape[1])
        index.add(seeds)
        inertia = float(index.search(sub, 1)[0].sum())
        if inertia < best_inertia:
            best, best_inertia = seeds, inertia
    return run(best)


def canonical(assign: np.ndarray) -> np.ndarray:
    """Cluster ids renamed in the order of their first member, so ties between clusters never depend on how a
    k-means implementation happens to number them."""
    _, first, inverse = np.unique(assign, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def cluster_pool(ctx: AcquisitionContext, k: int, seed: int, backend: str = "auto") -> np.ndarray:
    """[N] int64 k-means cluster of every pool point on the L2-normalised features, read through feature_chunks;
    cluster ids in the order of their first member (`canonical`)."""
    n = len(ctx.embeddings)
    if kmeans_backend(backend, n) == "sklearn":
        return canonical(kmeans_assign(features_of(ctx, np.arange(n), normalise=True), k, seed))
    rng = np.random.default_rng(seed)
    n_train = min(n, POINTS_PER_CENTROID * k)
    train_rows = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else np.arange(n)
    km = faiss_kmeans(features_of(ctx, train_rows, normalise=True), k, seed)
    assign = np.empty(n, np.int64)
    for idx, block in feature_chunks(ctx, normalise=True):
        assign[idx] = km.index.search(block, 1)[1][:, 0]  # nearest centroid
    return canonical(assign)


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
    n = len(ctx.embeddings)
    max_clusters = option(ctx, "typiclust_max_clusters", MAX_CLUSTERS, int)
    knn = option(ctx, "typiclust_knn", K_NN, int)
    k = max(1, min(int(ctx.labeled.sum()) + budget, max_clusters, n))
    assign = cluster_pool(ctx, k, int(rng.integers(2**31 - 1)), option(ctx, "typiclust_kmeans", "auto", str))  # [N]
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
        if len(members) > MAX_TYPICALITY_POINTS:
            members = np.sort(rng.choice(members, MAX_TYPICALITY_POINTS, replace=False))
        x = features_of(ctx, members, normalise=True)  # [m, D]
        best = members[int(np.argmax(typicality(x, min(knn, len(members) // 2))))]
        picked.append(int(best))
        taken[best] = True
        covered[c] += 1
        free[c] -= 1
    return np.asarray(picked, dtype=np.int64)
