"""Stage 3 strategies: hand-made cases with a known right pick, the select() contract, and a digits comparison.

The full digits table of docs/acquisition.md comes from `python bench/acq_digits.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alssl.acquisition import NEEDS_LABELS, STRATEGIES, AcquisitionContext, select
from alssl.acquisition.kcenter import kcenter_greedy
from alssl.acquisition.probcover import choose_delta, delta_from_radii, purity_radius
from alssl.acquisition.uncertainty import entropy_scores, top2_gap
from alssl.data import load_dataset
from alssl.errors import UserError
from alssl.probes import fit_probe
from alssl.rounds import strategy_rng

FAST = {"vaal_epochs": 1, "vaal_width": 8}  # keeps VAAL to ~1 s in the contract tests


def make_ctx(emb, labeled_idx=(), labels_of=None, num_classes=2, **kw) -> AcquisitionContext:
    emb = np.asarray(emb, np.float32)
    labeled = np.zeros(len(emb), bool)
    labeled[list(labeled_idx)] = True
    labels = np.full(len(emb), -1, np.int64)
    labels[labeled] = 0 if labels_of is None else np.asarray(labels_of)[labeled]
    return AcquisitionContext(embeddings=emb, labeled=labeled, labels=labels, num_classes=num_classes, **kw)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return d, d.x_train.reshape(len(d.x_train), -1).astype(np.float32)


# ------------------------------------------------------------------ contract
@pytest.mark.parametrize("name,n_labeled", [(s, n) for s in sorted(STRATEGIES) for n in (0, 30)
                                             if not (s in NEEDS_LABELS and n == 0)])  # those refuse: next test
def test_every_strategy_returns_exactly_b_unique_unlabeled_indices(digits, name, n_labeled, one_torch_thread):
    d, x = digits
    lab = np.random.default_rng(0).choice(len(x), n_labeled, replace=False)
    ctx = make_ctx(x, lab, d.y_train, num_classes=10, images=d.x_train, options=dict(FAST))
    picked = STRATEGIES[name](ctx, 25, np.random.default_rng(1))
    assert picked.dtype == np.int64 and picked.shape == (25,)
    assert len(np.unique(picked)) == 25 and not ctx.labeled[picked].any()
    again = select(name, ctx, 25, np.random.default_rng(1))
    assert np.array_equal(np.sort(again), np.sort(picked)), "same rng seed must give the same picks"


@pytest.mark.parametrize("name", sorted(NEEDS_LABELS))
def test_model_based_strategies_refuse_an_empty_labeled_set(name):
    ctx = make_ctx(np.random.default_rng(0).normal(size=(20, 4)), images=np.zeros((20, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match=f"strategy {name} needs labeled samples.*--strategy random"):
        select(name, ctx, 3, np.random.default_rng(0))
    with pytest.raises(UserError, match="--strategy random"):
        STRATEGIES[name](ctx, 3, np.random.default_rng(0))


def test_select_rejects_bad_requests():
    ctx = make_ctx(np.random.default_rng(0).normal(size=(10, 3)), [0, 1], [0, 1] + [0] * 8)
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="budget must be at least 1"):
        select("random", ctx, 0, rng)
    with pytest.raises(UserError, match="budget 9 is more than the 8 unlabeled samples left; ask for at most 8"):
        select("random", ctx, 9, rng)
    with pytest.raises(UserError, match='unknown strategy "kcentre" \\(did you mean "kcenter"\\?\\)'):
        select("kcentre", ctx, 2, rng)
    with pytest.raises(UserError, match='unknown acquisition option "detla" \\(did you mean "delta"\\?\\)'):
        select("probcover", make_ctx(np.eye(4), options={"detla": 0.3}), 1, rng)
    with pytest.raises(UserError, match="budget must be a whole number"):
        select("random", ctx, 2.5, rng)
    assert len(select("random", ctx, 8, rng)) == 8  # the whole unlabeled pool is a valid budget


# ------------------------------------------------------------------ uncertainty
def test_entropy_and_margin_scores_by_hand():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.7, 0.2, 0.1]])
    assert np.allclose(entropy_scores(p),
                       [np.log(2), 0.0, -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))])
    assert np.allclose(top2_gap(p), [0.0, 1.0, 0.5])


def _two_class_line():
    """Labeled: class 0 around x=-2, class 1 around x=+2; unlabeled at x = -5, 0.1, 4, -1.5, 2.5 (y spread)."""
    lab = [[-2, 0], [-2.5, 1], [-1.5, -1], [2, 0], [2.5, 1], [1.5, -1]]
    unl = [[-5, 0.5], [0.1, 3.0], [4, -0.5], [-1.5, 2.0], [2.5, -2.0]]
    y = [0, 0, 0, 1, 1, 1] + [-1] * 5
    return np.array(lab + unl, np.float32), list(range(6)), np.array(y)


@pytest.mark.parametrize("name", ["entropy", "margin", "svm-margin"])
def test_uncertainty_strategies_pick_the_boundary_point(name):
    emb, lab, y = _two_class_line()
    picked = select(name, make_ctx(emb, lab, y), 1, np.random.default_rng(0))
    assert picked.tolist() == [7]  # x = 0.1, nearest the boundary x = 0


def test_entropy_picks_the_point_confusing_three_classes_over_one_confusing_two():
    # classes at the corners of a triangle; one unlabeled point at the centre (3-way), one on an edge (2-way)
    corners = np.array([[0, 4], [-3.5, -2], [3.5, -2]], np.float32)
    rng = np.random.default_rng(0)
    lab = np.concatenate([c + 0.3 * rng.normal(size=(4, 2)) for c in corners]).astype(np.float32)
    unl = np.array([[0.0, 0.0], [0.0, -2.0], [0, 6], [-5, -3]], np.float32)  # centre, edge midpoint, two sure ones
    emb = np.concatenate([lab, unl])
    y = np.r_[np.repeat([0, 1, 2], 4), [-1] * 4]
    ctx = make_ctx(emb, range(12), y, num_classes=3)
    assert select("entropy", ctx, 1, np.random.default_rng(0)).tolist() == [12]
    probs = fit_probe("linear", lab, y[:12], num_classes=3).predict_proba(unl)
    assert entropy_scores(probs)[0] > entropy_scores(probs)[1] > entropy_scores(probs)[2]


def test_svm_margin_ranks_by_distance_to_the_hyperplane():
    lab = np.array([[-2, 0], [-2, 1], [-2, -1], [2, 0], [2, 1], [2, -1]], np.float32)  # hyperplane x = 0
    unl = np.array([[0.3, 5], [-1, 0], [3, 0], [-0.6, -3], [0.05, -4]], np.float32)
    ctx = make_ctx(np.concatenate([lab, unl]), range(6), np.r_[[0, 0, 0, 1, 1, 1], [-1] * 5])
    assert select("svm-margin", ctx, 3, np.random.default_rng(0)).tolist() == [10, 6, 9]  # |x| = .05, .3, .6


# ------------------------------------------------------------------ k-center greedy
def test_kcenter_picks_the_far_cluster_first():
    rng = np.random.default_rng(0)
    near = rng.normal(0, 0.1, size=(5, 3))  # labeled
    mid = rng.normal(0, 0.1, size=(5, 3)) + [10, 0, 0]
    far = rng.normal(0, 0.1, size=(5, 3)) + [100, 0, 0]
    emb = np.concatenate([near, mid, far])
    ctx = make_ctx(emb, range(5))
    first = select("kcenter", ctx, 1, rng)[0]
    farthest = 10 + np.argmax(np.linalg.norm(far[:, None] - near[None], axis=2).min(1))  # of the far cluster
    assert first == farthest
    two = select("kcenter", ctx, 2, rng)
    assert 10 <= two[0] < 15 and 5 <= two[1] < 10


def test_kcenter_with_duplicates_never_picks_a_copy_while_new_points_remain():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 512)).astype(np.float32) * 3 + 40  # large norms: copies get rounding residuals
    emb = np.repeat(distinct, 4, axis=0)  # rows 4k..4k+3 are copies of distinct[k]
    picked = select("kcenter", make_ctx(emb), 6, np.random.default_rng(0))
    assert sorted(picked // 4) == [0, 1, 2, 3, 4, 5]
    ctx = make_ctx(emb, [0, 1])  # distinct[0] labeled (twice)
    filled: set[int] = set()
    for seed in range(8):
        picked = select("kcenter", ctx, 12, np.random.default_rng(seed))
        assert sorted(picked[:5] // 4) == [1, 2, 3, 4, 5]  # every distinct point before any copy
        assert len(set(picked.tolist())) == 12 and not ctx.labeled[picked].any()
        filled |= set(picked[5:].tolist())
    # once only copies are left (distance 0) the rest is a random fill over all 18 copies, not a greedy pick of
    # the copies whose float32 rounding residual happens to be > 0
    assert len(filled) >= 15, sorted(filled)


def brute_force_kcenter(x: np.ndarray, labeled: np.ndarray, budget: int, first: int | None) -> list[int]:
    x = x.astype(np.float64)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))  # [N, N]
    centres = list(np.flatnonzero(labeled)) + ([first] if first is not None else [])
    picks = [] if first is None else [first]
    min_d = dist[:, centres].min(1)
    while len(picks) < budget:
        p = int(np.argmax(min_d))
        picks.append(p)
        min_d = np.minimum(min_d, dist[:, p])
    return picks


@pytest.mark.parametrize("n_labeled", [0, 1, 7])
def test_kcenter_equals_brute_force(n_labeled):
    rng = np.random.default_rng(n_labeled)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    ctx = make_ctx(x, rng.choice(300, n_labeled, replace=False))
    first = None if n_labeled else int(np.random.default_rng(5).choice(ctx.unlabeled_indices))
    ours = kcenter_greedy(ctx, 40, np.random.default_rng(5))
    assert ours.tolist() == brute_force_kcenter(x, ctx.labeled, 40, first)


def test_kcenter_never_builds_an_n_by_n_matrix():
    """30,000 points: an N×N float32 matrix would be 3.6 GB; the numpy peak must stay a few [N] vectors."""
    import tracemalloc

    x = np.random.default_rng(0).normal(size=(30000, 4)).astype(np.float32)  # 0.5 MB
    ctx = make_ctx(x, range(10))
    kcenter_greedy(ctx, 2, np.random.default_rng(0))  # imports faiss outside the measurement
    tracemalloc.start()
    picked = kcenter_greedy(ctx, 20, np.random.default_rng(0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(picked)) == 20
    assert peak < 40 * 4 * len(x), f"kcenter peak {peak / 2**20:.1f} MiB"  # ≈ 40 float32 [N] vectors


# ------------------------------------------------------------------ typiclust / probcover
def _blobs(rng, centres, counts, spreads):
    return np.concatenate([c + s * rng.normal(size=(n, len(c)))
                           for c, n, s in zip(centres, counts, spreads)]).astype(np.float32)


def test_typiclust_picks_the_dense_core_of_the_largest_unlabeled_cluster():
    rng = np.random.default_rng(0)
    e = np.eye(8) * 10
    a = _blobs(rng, [e[0]], [20], [0.5])  # rows 0..19, two labeled
    b_core = _blobs(rng, [e[1]], [12], [0.1])  # rows 20..31: dense core of the big cluster
    b_halo = _blobs(rng, [e[1]], [18], [1.2])  # rows 32..49: its sparse halo
    c = _blobs(rng, [e[2]], [20], [0.5])  # rows 50..69: smaller unlabeled cluster
    ctx = make_ctx(np.concatenate([a, b_core, b_halo, c]), [0, 1])
    picked = select("typiclust", ctx, 1, np.random.default_rng(0))
    assert 20 <= picked[0] < 32
    ctx = make_ctx(np.concatenate([a, b_core, b_halo, c]), [0])
    picked = select("typiclust", ctx, 2, np.random.default_rng(0))
    assert 20 <= picked[0] < 32 and 50 <= picked[1] < 70


def _ten_blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 well-separated Gaussian blobs of 20..200 points in 32-d (unequal sizes)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 200, 10)
    centres = rng.normal(size=(10, 32)) * 10
    x = np.concatenate([c + rng.normal(size=(n, 32)) for c, n in zip(centres, sizes)]).astype(np.float32)
    return x, np.repeat(np.arange(10), sizes)


def test_typiclust_cold_start_covers_all_10_blobs_for_5_of_5_seeds():
    """Acceptance (issue 16): budget 10 from nothing on 10 blobs → one pick per blob. One faiss k-means run from a
    random init (the old clustering) covered 7-8 blobs here; k-means++ with 10 restarts (official) covers all."""
    for seed in range(5):
        x, y = _ten_blobs(seed)
        ctx = make_ctx(x, num_classes=10)
        picked = select("typiclust", ctx, 10, np.random.default_rng(seed))
        assert len(set(y[picked].tolist())) == 10, (seed, np.bincount(y[picked], minlength=10))
        again = select("typiclust", make_ctx(x, num_classes=10), 10, np.random.default_rng(seed))
        assert np.array_equal(picked, again)  # deterministic for a seed


def test_typiclust_clusters_like_the_official_code(monkeypatch):
    """k ≤ 50: KMeans(k-means++, n_init=10); k > 50: MiniBatchKMeans(batch_size=5000, n_init=3)."""
    import sklearn.cluster

    from alssl.acquisition.typiclust import kmeans_assign

    used = []
    for name in ("KMeans", "MiniBatchKMeans"):
        real = getattr(sklearn.cluster, name)

        def make(real=real, name=name):
            class Spy(real):
                def __init__(self, **kw):
                    used.append((name, kw["n_clusters"], kw["n_init"], kw.get("batch_size")))
                    super().__init__(**kw)
            return Spy
        monkeypatch.setattr(sklearn.cluster, name, make())
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    assert len(np.unique(kmeans_assign(x, 50, seed=0))) == 50
    kmeans_assign(x, 51, seed=0)
    assert used == [("KMeans", 50, 10, None), ("MiniBatchKMeans", 51, 3, 5000)]


def test_probcover_covers_two_separated_blobs_before_a_second_point_in_either():
    rng = np.random.default_rng(0)
    e = np.eye(6)
    blobs = _blobs(rng, [e[0], e[1]], [40, 25], [0.05, 0.05])  # rows 0..39 and 40..64, far apart after L2 norm
    for options in ({"delta": 0.4}, {}):  # a given delta, and the purity heuristic
        picked = select("probcover", make_ctx(blobs, options=options), 2, np.random.default_rng(0))
        assert picked[0] < 40 <= picked[1], options  # the bigger blob covers more, then the other blob
    picked = select("probcover", make_ctx(blobs, [3], options={"delta": 0.4}), 1, np.random.default_rng(0))
    assert picked[0] >= 40  # the labeled point already covers the first blob


def test_probcover_delta_heuristic_follows_purity():
    rng = np.random.default_rng(0)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    far = unit(_blobs(rng, np.eye(4)[:2], [30, 30], [0.02, 0.02]))  # orthogonal blobs, ~sqrt(2) apart
    delta = choose_delta(far, 2)
    assert 1.3 < delta < 1.5  # the balls may grow until they reach the other blob
    near = unit(_blobs(rng, [[1, 0, 0, 0], [1, 0.3, 0, 0]], [30, 30], [0.01, 0.01]))  # ~0.29 apart
    assert 0.2 <= choose_delta(near, 2) <= 0.3


def test_probcover_delta_is_the_largest_radius_with_95_percent_pure_balls():
    # 20 points on a line: 0..9 at 0.00..0.09 (pseudo-label 0), 10..19 at 0.50..0.59 (pseudo-label 1). By hand,
    # the distance to the other label is 0.41 for the two facing ends, 0.42 for the next two, ... 0.50 for the
    # outer ends. With alpha = 0.9, 18 of 20 balls must stay pure: delta = the 18th largest r = 0.42.
    x = np.r_[np.arange(10) * 0.01, 0.5 + np.arange(10) * 0.01][:, None].astype(np.float32)
    pseudo = (np.arange(20) >= 10).astype(np.int64)
    r = purity_radius(x, pseudo)
    assert np.allclose(np.sort(r)[:4], [0.41, 0.41, 0.42, 0.42], atol=1e-5)
    delta = delta_from_radii(r, 0.9)
    assert delta == pytest.approx(0.42, abs=1e-5)
    assert (r >= delta).mean() >= 0.9 and (r >= delta + 1e-3).mean() < 0.9  # largest such delta
    assert delta_from_radii(r, 1.0) == pytest.approx(0.41, abs=1e-5)  # every ball pure
    assert delta_from_radii(np.full(5, np.inf)) == 2.0 and delta_from_radii(np.zeros(5)) > 0
    with pytest.raises(UserError, match="probcover_alpha must be in"):
        delta_from_radii(r, 1.5)


# ------------------------------------------------------------------ at scale (issue 29): same picks where small
def test_typiclust_faiss_kmeans_picks_what_the_sklearn_path_picks_where_the_clusterings_agree():
    """The faiss k-means (used above 50,000 points) changes only the clustering: on separated blobs, where both
    clusterings find the blobs, the picks are the same points, cold start and with labels."""
    from alssl.acquisition.typiclust import cluster_pool

    for seed in range(3):
        x, y = _ten_blobs(seed)
        for labeled in ((), np.flatnonzero(y == 3)[:4]):
            picks = {}
            for backend in ("sklearn", "faiss"):  # K = 10 clusters: the blobs, for both
                options = {"typiclust_kmeans": backend, "typiclust_max_clusters": 10}
                ctx = make_ctx(x, labeled, num_classes=10, options=options)
                picks[backend] = select("typiclust", ctx, 10, np.random.default_rng(seed))
            assert picks["faiss"].tolist() == picks["sklearn"].tolist(), (seed, len(labeled))
        ctx = make_ctx(x, num_classes=10)
        a, b = cluster_pool(ctx, 10, 0, "sklearn"), cluster_pool(ctx, 10, 0, "faiss")
        assert len(set(zip(a.tolist(), b.tolist()))) == 10  # the same partition, up to cluster names
        many = cluster_pool(ctx, 60, 0, "faiss")  # k > 50: best of 3 seedings on a subset, run once
        assert len(set(zip(many.tolist(), y.tolist()))) == len(np.unique(many)) > 40  # no cluster spans two blobs
    with pytest.raises(UserError, match="typiclust_kmeans must be one of auto, sklearn, faiss"):
        select("typiclust", make_ctx(x, options={"typiclust_kmeans": "torch"}), 3, np.random.default_rng(0))


def sparse_graph_probcover(x: np.ndarray, labeled: np.ndarray, delta: float, budget: int, rng) -> list[int]:
    """ProbCover's greedy as alssl ran it before issue 29: the whole δ-ball graph in a scipy sparse matrix
    (faiss exact range search), out-edges = balls; the reference the bounded-memory version must equal."""
    import faiss
    import scipy.sparse as sp

    from alssl.acquisition.base import l2_normalise

    x = l2_normalise(x)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    lims, _, cols = index.range_search(x, float(delta) ** 2)
    graph = sp.csr_matrix((np.ones(len(cols), bool), cols, lims.astype(np.int64)), shape=(len(x), len(x)))
    into = graph.T.tocsr()
    covered = np.zeros(len(x), bool)
    covered[graph[np.flatnonzero(labeled)].indices] = True
    degree = np.asarray(graph @ (~covered).astype(np.int64)).ravel()
    picked = []
    for _ in range(budget):
        best = degree.max(initial=0)
        if best <= 0:
            break
        p = int(rng.choice(np.flatnonzero(degree == best)))
        new = graph.indices[graph.indptr[p] : graph.indptr[p + 1]]
        new = new[~covered[new]]
        covered[new] = True
        degree -= np.bincount(into[new].indices, minlength=len(x))
        picked.append(p)
    return picked


@pytest.mark.parametrize("delta", [0.3, 0.6, 1.0])
def test_probcover_bounded_memory_equals_the_sparse_graph(delta, monkeypatch):
    """Same picks, same order, as the stored graph, with distance blocks far smaller than the pool (several
    blocks per pass, so the block bookkeeping is exercised)."""
    import alssl.acquisition.probcover as pc

    monkeypatch.setattr(pc, "Q_CHUNK", 37)
    monkeypatch.setattr(pc, "DB_CHUNK", 101)
    x, y = _ten_blobs(1)
    x = x + np.random.default_rng(2).normal(size=x.shape).astype(np.float32) * 3  # overlapping balls
    for labeled in ((), np.flatnonzero(y == 0)[:5].tolist() + [7]):
        ctx = make_ctx(x, labeled, num_classes=10, options={"delta": delta})
        ours = pc.probcover_select(ctx, 30, np.random.default_rng(4))
        ref = sparse_graph_probcover(x, ctx.labeled, delta, 30, np.random.default_rng(4))
        assert ours[: len(ref)].tolist() == ref, (delta, len(labeled))


def test_probcover_above_max_points_works_on_a_fixed_subsample():
    x, y = _ten_blobs(0)
    lab = np.flatnonzero(y == 2)[:3]
    runs = []
    for seed in (0, 1):
        ctx = make_ctx(x, lab, num_classes=10, options={"probcover_max_points": 300})
        runs.append((select("probcover", ctx, 8, np.random.default_rng(seed)), ctx.info))
    (a, info), (b, _) = runs
    assert info["probcover_points"] == 300 and info["random_fill"] == 0
    from alssl.acquisition.probcover import work_rows

    rows = work_rows(len(x), 300)
    assert np.isin(a, rows).all() and np.isin(b, rows).all()  # candidates come from the subsample
    assert len(set(y[a].tolist())) == 8  # still one pick per uncovered blob while blobs are left


class BlockReads:
    """Embeddings that answer only row reads (slices, index arrays) of at most `limit` rows, like a big memmap
    should be read; a whole-array conversion raises."""

    def __init__(self, x: np.ndarray, limit: int):
        self.x, self.limit, self.shape, self.dtype, self.ndim = x, limit, x.shape, x.dtype, x.ndim

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows):
        out = self.x[rows]
        assert out.ndim == 2 and len(out) <= self.limit, f"read {out.shape} at once"
        return out

    def __array__(self, *a, **k):
        raise AssertionError("read the whole embedding matrix at once")


def test_every_strategy_reads_its_features_through_the_accessor(digits, monkeypatch):
    """Every feature-based strategy answers on embeddings that only allow block reads of FEATURE_CHUNK rows."""
    import alssl.acquisition.base as base

    d, x = digits
    monkeypatch.setattr(base, "FEATURE_CHUNK", 256)
    lab = np.random.default_rng(0).choice(len(x), 30, replace=False)
    for name in sorted(set(STRATEGIES) - {"random", "vaal"}):
        ctx = make_ctx(x, lab, d.y_train, num_classes=10)
        ctx.embeddings = BlockReads(x, 256)
        picked = select(name, ctx, 12, np.random.default_rng(0))
        assert len(np.unique(picked)) == 12, name


# ------------------------------------------------------------------ BADGE / Cluster-Margin (issue 29)
def official_badge_init_centers(X: np.ndarray, K: int, rng: np.random.Generator) -> list[int]:
    """A transcription of the official BADGE k-means++ seeding (JordanAsh/badge, query_strategies/
    badge_sampling.py `init_centers`) on materialised gradient embeddings X, with one change: scipy's
    `rv_discrete(...).rvs()` (global numpy RNG) is replaced by an inverse-CDF draw from `rng`, so both sides can
    be fed the same uniform numbers."""
    from sklearn.metrics import pairwise_distances

    ind = int(np.argmax([np.linalg.norm(s, 2) for s in X]))
    mu, inds_all = [X[ind]], [ind]
    while len(mu) < K:
        if len(mu) == 1:
            D2 = pairwise_distances(X, mu).ravel().astype(float)
        else:
            newD = pairwise_distances(X, [mu[-1]]).ravel().astype(float)
            D2 = np.minimum(D2, newD)
        Ddist = (D2**2) / sum(D2**2)
        draw = lambda: min(int(np.searchsorted(np.cumsum(Ddist), rng.random(), side="right")), len(X) - 1)  # noqa: E731, B023 (used in this iteration only)
        ind = draw()
        while ind in inds_all:
            ind = draw()
        mu.append(X[ind])
        inds_all.append(ind)
    return inds_all


def test_badge_picks_what_the_official_seeding_picks_on_the_same_gradient_embeddings(digits):
    """Same probe, same uniform draws: alssl's factorised k-means++ (never materialising g) against the
    transcribed official init_centers on the materialised embeddings; pick overlap over 3 seeds."""
    from alssl.acquisition.badge import badge_picks, gradient_embedding

    d, x = digits
    x, y = x[:400], d.y_train[:400]
    overlaps = []
    for seed in range(3):
        lab = np.random.default_rng(seed).choice(len(x), 20, replace=False)
        ctx = make_ctx(x, lab, y, num_classes=10)
        probe = fit_probe("linear", x[lab], y[lab], num_classes=10, seed=seed)
        cand = ctx.unlabeled_indices
        ours = badge_picks(ctx, probe, cand, 30, np.random.default_rng(seed))
        ref = cand[official_badge_init_centers(gradient_embedding(probe, x[cand]), 30, np.random.default_rng(seed))]
        assert ours[0] == ref[0]  # the largest gradient norm
        overlaps.append(len(set(ours.tolist()) & set(ref.tolist())) / 30)
    assert np.mean(overlaps) >= 0.9, overlaps


def test_badge_gradient_embedding_by_hand():
    """g = (p − e_ŷ) ⊗ z: for a 2-class probe, the predicted class's block is (p_ŷ − 1)·z, the other p_other·z."""
    from alssl.acquisition.badge import gradient_embedding

    lab = np.array([[-2, 0], [-2, 1], [2, 0], [2, 1]], np.float32)
    probe = fit_probe("linear", lab, np.array([0, 0, 1, 1]), num_classes=2)
    q = np.array([[1.0, 0.5]], np.float32)
    p = probe.predict_proba(q)[0]
    z = probe.scaler.transform(q)[0]
    assert p.argmax() == 1
    assert np.allclose(gradient_embedding(probe, q)[0], np.r_[p[0] * z, (p[1] - 1) * z])


def test_badge_prefers_uncertain_points_and_spreads_them():
    """Three labeled classes at the corners of a triangle; unlabeled: sure points next to the corners and two tight
    groups on the midpoints of two different edges (uncertain between different class pairs). The first pick
    (largest gradient norm) is an uncertain point; without the sure points, two picks take one of each group
    (a second pick from the same group would be a copy of the first gradient)."""
    rng = np.random.default_rng(0)
    corners = np.array([[0, 4], [-3.5, -2], [3.5, -2]])
    lab = np.concatenate([c + 0.3 * rng.normal(size=(4, 2)) for c in corners])
    sure = np.concatenate([c * 1.5 + 0.1 * rng.normal(size=(6, 2)) for c in corners])
    edge_a = (corners[0] + corners[1]) / 2 + 0.02 * rng.normal(size=(5, 2))
    edge_b = (corners[1] + corners[2]) / 2 + 0.02 * rng.normal(size=(5, 2))
    y = np.repeat([0, 1, 2], 4)
    emb = np.concatenate([lab, edge_a, edge_b, sure]).astype(np.float32)  # groups: rows 12..16, 17..21
    ctx = make_ctx(emb, range(12), np.r_[y, [-1] * 28], num_classes=3)
    assert 12 <= select("badge", ctx, 1, np.random.default_rng(0))[0] < 22
    ctx = make_ctx(emb[:22], range(12), np.r_[y, [-1] * 10], num_classes=3)
    for seed in range(5):
        picked = select("badge", ctx, 2, np.random.default_rng(seed))
        assert sorted(i >= 17 for i in picked) == [False, True], picked


def test_cluster_margin_takes_round_robin_from_the_smallest_clusters(tmp_path):
    """Planted clusters of 2, 4, 8 and 16 points, all of them margin candidates (k_m ≥ pool): the picks go
    smallest cluster first, one per cluster per round, and the clusters are computed once per feature set."""
    import alssl.acquisition.cluster_margin as cm

    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 50
    sizes = [16, 2, 8, 4]
    blobs = np.concatenate([c + rng.normal(0, 0.1, (n, 8)) for c, n in zip(centres, sizes)])
    lab = np.array([[0.0] * 8, [100.0] + [0.0] * 7])  # two labeled points, one per class, far from every blob
    emb = np.concatenate([lab, blobs]).astype(np.float32)
    cluster_of = np.r_[[-1, -1], np.repeat(np.arange(4), sizes)]
    size_of = np.r_[[0, 0], np.repeat(sizes, sizes)]
    options = {"cluster_margin_clusters": 4}
    cm._CLUSTERS.clear()
    for seed in range(3):
        ctx = make_ctx(emb, [0, 1], np.r_[[0, 1], [-1] * 30], options=options, cache_dir=tmp_path)
        picked = select("cluster-margin", ctx, 9, np.random.default_rng(seed))
        assert ctx.info["clusters_source"] == ("computed" if seed == 0 else "cached")
        assert [size_of[i] for i in picked] == [2, 4, 8, 16, 2, 4, 8, 16, 4]  # rounds, smallest first
        assert len(set(cluster_of[picked[:4]].tolist())) == 4
    cm._CLUSTERS.clear()  # a fresh process reads the stored clusters
    ctx = make_ctx(emb, [0, 1], np.r_[[0, 1], [-1] * 30], options=options, cache_dir=tmp_path)
    select("cluster-margin", ctx, 3, np.random.default_rng(0))
    assert ctx.info["clusters_source"] == "cached" and len(list(tmp_path.glob("*.cluster-margin-4.npy"))) == 1


def test_cluster_margin_candidates_are_the_lowest_margins():
    """k_m = 1 × B: the picks are exactly the B smallest-margin points (round-robin only orders them)."""
    emb, lab, y = _two_class_line()
    ctx = make_ctx(emb, lab, y, options={"cluster_margin_candidates": 1})
    assert select("cluster-margin", ctx, 1, np.random.default_rng(0)).tolist() == [7]


def test_cluster_margin_on_micro_clusters_above_hac_points(monkeypatch):
    """Above HAC_POINTS the HAC runs on k-means micro-cluster centroids: separated blobs still come out whole."""
    import alssl.acquisition.cluster_margin as cm

    monkeypatch.setattr(cm, "HAC_POINTS", 60)
    x, y = _ten_blobs(0)
    clusters = cm.hac_clusters(make_ctx(x), 10)
    assert len(set(zip(clusters.tolist(), y.tolist()))) == 10


# ------------------------------------------------------------------ near-duplicates (issue 29)
def _planted_duplicates(seed: int = 0):
    """40 distinct points in 32-d, point k copied 1 + k % 4 times with tiny noise (cosine > 0.999): 100 rows."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(40, 32))
    group = np.repeat(np.arange(40), 1 + np.arange(40) % 4)
    x = (distinct[group] + 0.003 * rng.normal(size=(len(group), 32))).astype(np.float32)
    order = rng.permutation(len(x))  # copies scattered over the pool
    return x[order], group[order]


def test_duplicate_groups_finds_the_planted_copies_exact_and_with_the_ivf_index(monkeypatch):
    import alssl.acquisition.duplicates as dup

    x, group = _planted_duplicates()
    for exact_max in (10**6, 10):  # flat index, then the inverted-file index
        monkeypatch.setattr(dup, "EXACT_MAX_N", exact_max)
        found = dup.duplicate_groups(make_ctx(x))
        assert len(set(zip(found.tolist(), group.tolist()))) == 40 == len(np.unique(found))
    assert dup.summary(group) == {"groups": 30, "images": 90}


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"vaal"}))
def test_no_query_contains_two_near_duplicates_or_a_copy_of_a_labeled_image(name):
    x, group = _planted_duplicates()
    labels = group % 3
    lab = [int(np.flatnonzero(group == g)[0]) for g in (3, 7, 11, 15, 2, 5)]  # groups of 4, and 3 / 2 copies
    for seed in range(2):
        ctx = make_ctx(x, lab, labels, num_classes=3, options={"skip_duplicates": True})
        picked = select(name, ctx, 20, np.random.default_rng(seed))
        assert len(set(group[picked].tolist())) == 20, name  # one per group
        assert not set(group[picked].tolist()) & set(group[lab].tolist()), name  # no copy of a labeled image
        assert ctx.info["duplicates_skipped"] >= 0


def test_skip_duplicates_when_only_copies_are_left_says_so(capsys):
    x, group = _planted_duplicates()
    ctx = make_ctx(x, options={"skip_duplicates": "true"})
    picked = select("kcenter", ctx, 45, np.random.default_rng(0))
    assert len(set(group[picked].tolist())) == 40 and len(np.unique(picked)) == 45
    assert "5 of the 45 picks are random" in capsys.readouterr().err
    with pytest.raises(UserError, match="skip_duplicates='maybe' is not true or false"):
        select("random", make_ctx(x, options={"skip_duplicates": "maybe"}), 3, np.random.default_rng(0))


def test_cli_query_on_an_image_folder_skips_duplicates_and_status_counts_them(tmp_path):
    from PIL import Image

    from conftest import run_cli_inprocess as cli

    pool = tmp_path / "photos"
    pool.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        img.save(pool / f"img{i:02d}.png")
        if i < 6:  # six photos saved twice
            img.save(pool / f"img{i:02d} copy.png")
    run = tmp_path / "run"
    r = cli("pretrain", "--data", str(pool), "--out", str(run), "--epochs", "0", "--image-size", "16", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("query", str(run), "--budget", "16", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    ids = [line.split(",", 1)[1].strip('"') for line in (run / "queries" / "round-0.csv").read_text().splitlines()[1:]]
    assert len({i.replace(" copy", "") for i in ids}) == 16  # every photo once
    status = json.loads(cli("status", str(run), "--json").stdout)
    (summary,) = status["near_duplicates"].values()
    assert summary["groups"] == 6 and summary["images"] == 12 and summary["pool"] == 22


# ------------------------------------------------------------------ VAAL
@pytest.fixture
def one_torch_thread():
    """Tiny convnets: two threads on a shared 2-core CPU ran the VAAL case ~17x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vaal_trains_like_the_official_solver(one_torch_thread, monkeypatch):
    """Separate labeled / unlabeled VAE passes (never one mixed BatchNorm batch), inputs in [-1, 1], 2 VAE steps and
    1 discriminator step per iteration, ⌈epochs·N / batch⌉ iterations; the least 'labeled'-looking are queried."""
    import alssl.acquisition.vaal as vaal

    images = np.concatenate([np.zeros((20, 8, 8, 1), np.uint8), np.full((40, 8, 8, 1), 255, np.uint8)])
    batches, counts = [], {"vae": 0, "disc": 0}
    real_build, real_vaal, real_disc = vaal.build, vaal.vaal_loss, vaal.disc_loss

    def spy_build(*a, **k):
        vae, disc = real_build(*a, **k)
        vae.register_forward_pre_hook(lambda mod, args: batches.append(args[0].detach().clone()))
        return vae, disc

    def spy_vaal(lab, unl, *a, **k):
        counts["vae"] += 1
        return real_vaal(lab, unl, *a, **k)

    def spy_disc(*a, **k):
        counts["disc"] += 1
        return real_disc(*a, **k)

    monkeypatch.setattr(vaal, "build", spy_build)
    monkeypatch.setattr(vaal, "vaal_loss", spy_vaal)
    monkeypatch.setattr(vaal, "disc_loss", spy_disc)
    ctx = make_ctx(images.reshape(60, -1), range(20), np.zeros(60, int), num_classes=1, images=images,
                   options={"vaal_epochs": 2, "vaal_batch_size": 16, "vaal_width": 4})
    picked = select("vaal", ctx, 5, np.random.default_rng(0))
    steps = math.ceil(2 * 60 / 16)  # 8 iterations
    assert counts == {"vae": 2 * steps, "disc": steps}
    assert all(set(x.unique().tolist()) in ({-1.0}, {1.0}) for x in batches)  # one pool per forward, in [-1, 1]
    assert sum(1 for x in batches if float(x[0, 0, 0, 0]) == -1.0) == 3 * steps  # labeled: 2 VAE + 1 disc pass
    assert picked.min() >= 20


def test_vaal_losses_use_the_official_reductions_by_hand():
    """sinhasam/vaal solver.py: MSE mean over elements + β·KL SUMMED over batch and dims; batch-mean BCE terms."""
    import torch

    from alssl.acquisition.vaal import disc_loss, vaal_loss, vae_loss

    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    recon = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(2, 1, 1, 2)  # squared errors 0.25, 0.25, 0, 1: mean 0.375
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])
    # KL terms −½(1 + lv − μ² − e^lv): 0.5, 0, 0, 2.5 − ½ln2  → sum 3 − ½ln2
    assert vae_loss(x, recon, mu, logvar).item() == pytest.approx(0.375 + 3 - 0.5 * math.log(2.0), abs=1e-6)
    perfect = (x[:1], x[:1], torch.zeros(1, 2), torch.zeros(1, 2))  # exact reconstruction, posterior = prior: 0
    d_l, d_u = torch.zeros(2, 1), torch.zeros(1, 1)  # D says 1/2 everywhere: BCE = ln 2 per pool
    assert vaal_loss((x, recon, mu, logvar), perfect, d_l, d_u).item() == pytest.approx(
        0.375 + 3 - 0.5 * math.log(2.0) + 2 * math.log(2.0), abs=1e-6)
    # discriminator: labeled logit 0 → ln 2; unlabeled logit ln 3 (P = 3/4, target 0) → −ln(1/4)
    assert disc_loss(torch.zeros(1, 1), torch.full((1, 1), math.log(3.0))).item() == pytest.approx(3 * math.log(2.0))


def test_vaal_width_128_is_the_official_architecture_on_32px():
    from torch import nn

    from alssl.acquisition.vaal import build

    vae, disc = build(3, 32, 128)
    layers = [(type(m).__name__, tuple(m.weight.shape))
              for m in [*vae.encoder, vae.fc_mu, vae.fc_logvar, *vae.decoder, *disc]
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d))]
    official = [  # sinhasam/vaal model.py, VAE(z_dim=32, nc=3) and Discriminator(32)
        ("Conv2d", (128, 3, 4, 4)), ("BatchNorm2d", (128,)), ("Conv2d", (256, 128, 4, 4)), ("BatchNorm2d", (256,)),
        ("Conv2d", (512, 256, 4, 4)), ("BatchNorm2d", (512,)), ("Conv2d", (1024, 512, 4, 4)), ("BatchNorm2d", (1024,)),
        ("Linear", (32, 4096)), ("Linear", (32, 4096)),
        ("Linear", (16384, 32)), ("ConvTranspose2d", (1024, 512, 4, 4)), ("BatchNorm2d", (512,)),
        ("ConvTranspose2d", (512, 256, 4, 4)), ("BatchNorm2d", (256,)), ("ConvTranspose2d", (256, 128, 4, 4)),
        ("BatchNorm2d", (128,)), ("ConvTranspose2d", (128, 3, 1, 1)),
        ("Linear", (512, 32)), ("Linear", (512, 512)), ("Linear", (1, 512))]
    assert layers == official
    assert all(m.bias is None for m in vae.encoder if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------------ digits: strategies vs random
def test_typiclust_beats_random_at_one_percent_of_digits(digits):
    """The robust low-budget result (Hacohen'22; docs/acquisition.md, +24 points on pixels over 5 seeds): 14 typical
    points, one per k-means cluster, beat 14 random ones. Features: the raw 64 pixels, a cheap fixed embedding."""
    d, x = digits
    xt = d.x_test.reshape(len(d.x_test), -1).astype(np.float32)
    n = round(0.01 * len(x))
    acc = {}
    for name in ("random", "typiclust"):
        accs = []
        for seed in range(5):
            ctx = make_ctx(x, (), num_classes=10)
            idx = select(name, ctx, n, strategy_rng(seed, 0, name))
            accs.append(fit_probe("linear", x[idx], d.y_train[idx], num_classes=10, seed=seed).accuracy(xt, d.y_test))
        acc[name] = float(np.mean(accs))
    assert acc["typiclust"] >= acc["random"] + 0.05, acc
    assert acc["typiclust"] >= 0.6, acc


# ------------------------------------------------------------------ ProbCover: one delta per feature set,
# visible random fill
def test_probcover_delta_is_estimated_once_per_feature_set_and_stored(tmp_path):
    from alssl.acquisition.probcover import delta_cache_path

    x, _ = _ten_blobs(0)
    deltas = []
    for seed in (1, 2, 3):  # query seeds differ; delta must not
        ctx = make_ctx(x, num_classes=10, cache_dir=tmp_path)
        select("probcover", ctx, 5, np.random.default_rng(seed))
        deltas.append((ctx.info["delta"], ctx.info["delta_source"]))
    assert deltas[0][1] == "estimated" and [s for _, s in deltas[1:]] == ["cached", "cached"]
    assert len({d for d, _ in deltas}) == 1
    stored = json.loads(delta_cache_path(tmp_path, x).read_text())
    assert stored["delta"] == {"alpha=0.95,classes=10": pytest.approx(deltas[0][0], abs=1e-6)}
    fresh = make_ctx(x, num_classes=10)  # no cache dir: re-estimated, still the same (k-means seed 0)
    select("probcover", fresh, 5, np.random.default_rng(9))
    assert fresh.info["delta"] == deltas[0][0] and fresh.info["delta_source"] == "estimated"
    given = make_ctx(x, num_classes=10, cache_dir=tmp_path, options={"delta": 0.5})
    select("probcover", given, 5, np.random.default_rng(9))
    assert given.info["delta"] == 0.5 and given.info["delta_source"] == "option"


def test_probcover_says_when_coverage_runs_out_and_counts_random_picks(capsys):
    # pairs {0, 1}, {2, 3}, {4, 5} (points 0.04 apart) and a lone 6; 4 and 6 labeled, delta 0.5: one pick per free
    # pair covers everything, so a budget of 4 is 2 coverage picks + 2 random ones
    emb = np.array([[1, 0], [0.999, 0.04], [-1, 0], [-0.999, 0.04], [0, 1], [0.04, 0.999], [0, -1]], np.float32)
    ctx = make_ctx(emb, labeled_idx=[4, 6], num_classes=2, options={"delta": 0.5})
    picked = select("probcover", ctx, 4, np.random.default_rng(0))
    err = capsys.readouterr().err
    assert ctx.info["random_fill"] == 2
    assert err.count("warning:") == 1 and "2 of the 4 picks are random" in err and "probcover" in err
    assert {0, 1} & set(picked.tolist()) and {2, 3} & set(picked.tolist())
    ctx2 = make_ctx(emb, labeled_idx=[4, 6], num_classes=2, options={"delta": 0.5})
    select("probcover", ctx2, 2, np.random.default_rng(0))
    assert ctx2.info["random_fill"] == 0 and "warning" not in capsys.readouterr().err


def test_cli_probcover_on_two_copies_of_a_run_with_other_seeds_uses_the_same_delta(tmp_path):
    """Acceptance (issue 16): δ belongs to the run's feature set; `alssl status` shows it."""
    import shutil

    from conftest import run_cli_inprocess as cli

    base = tmp_path / "base"
    assert cli("pretrain", "--data", "digits", "--out", str(base), "--epochs", "0", "-q").returncode == 0
    assert cli("query", str(base), "--budget", "10", "--strategy", "random").returncode == 0
    assert cli("label", str(base), "--oracle").returncode == 0
    got = []
    for name, seed in (("a", "1"), ("b", "2")):
        run = tmp_path / name
        shutil.copytree(base, run)
        r = cli("query", str(run), "--budget", "20", "--strategy", "probcover", "--seed", seed)
        assert r.returncode == 0, r.stderr
        state = json.loads((run / "state.json").read_text())
        info = state["open_query"]["info"]
        status = json.loads(cli("status", str(run), "--json").stdout)
        (sha, deltas), = status["probcover_delta"].items()
        assert deltas["alpha=0.95,classes=10"] == pytest.approx(info["delta"], abs=1e-6)
        assert info["random_fill"] == 0
        got.append((info["delta"], state["open_query"]["indices"]))
        assert cli("label", str(run), "--oracle").returncode == 0  # the round keeps the metadata
        assert json.loads((run / "state.json").read_text())["rounds"][-1]["info"]["delta"] == info["delta"]
        r = cli("query", str(run), "--budget", "5", "--strategy", "probcover", "--seed", seed)  # later query: reused
        assert json.loads((run / "state.json").read_text())["open_query"]["info"]["delta_source"] == "cached"
    assert got[0][0] == got[1][0]


# ------------------------------------------------------------------ bench/acq_scale.py runs (its numbers: docs)
def test_acq_scale_bench_small_mode_prints_its_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "acq_scale.py"), "--small", "--strategies",
                          "probcover", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| probcover | " in out.stdout and "exponent" in out.stdout and "load=" in out.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"probcover"} and set(results["probcover"]) == {"300", "1000"}
    assert all(r["picked"] == 10 and r["peak_rss_mb"] >= r["base_rss_mb"] for v in results.values() for r in v.values())


def _long_tail_blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """10 separated blobs in 16-D: class 0 holds 500 points, classes 1-9 hold 25 each (imbalance 20)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 16)) * 10
    y = np.concatenate([np.zeros(500, np.int64), np.repeat(np.arange(1, 10), 25)])
    return (centres[y] + rng.normal(size=(len(y), 16))).astype(np.float32), y


@pytest.mark.parametrize("name", ["random", "margin", "typiclust", "kcenter"])
def test_balance_spreads_picks_over_the_classes_of_a_long_tailed_pool(name):
    x, y = _long_tail_blobs()
    labeled = np.zeros(len(y), bool)
    labeled[[0, 1] + [500 + 25 * c for c in range(9)] + [501 + 25 * c for c in range(9)]] = True  # 2 per class
    labels = np.where(labeled, y, -1)

    def picks(balance: bool) -> np.ndarray:
        ctx = AcquisitionContext(embeddings=x, labeled=labeled, labels=labels, num_classes=10,
                                 options={"balance": balance, "balance_factor": 5})
        return np.bincount(y[select(name, ctx, 40, np.random.default_rng(0))], minlength=10)

    plain, balanced = picks(False), picks(True)
    assert balanced.sum() == plain.sum() == 40
    assert balanced.max() <= plain.max() and balanced.std() < plain.std()  # flatter, as far as candidates allow
    if name == "random":  # candidates in every class: 4 a class (2 + 4 labels each), the head no more
        assert plain[0] >= 20 and balanced[0] <= 6 and balanced.min() >= 2


def test_balance_before_labels_uses_clusters():
    x, y = _long_tail_blobs(1)
    ctx = AcquisitionContext(embeddings=x, labeled=np.zeros(len(y), bool), labels=np.full(len(y), -1), num_classes=10,
                             options={"balance": "true", "balance_factor": 10})
    counts = np.bincount(y[select("random", ctx, 20, np.random.default_rng(0))], minlength=10)
    assert counts[0] <= 4 and (counts > 0).sum() >= 8 and sum(ctx.info["balance"].values()) == 20
