"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall 2022, "Active Learning Through a Covering Lens",
arXiv 2205.11320).

On L2-normalised embeddings: the δ-ball graph has an edge i → j when ||x_i − x_j|| < δ (self-loops included, so
a point covers itself). Points covered by the labeled set are removed first; then, B times, pick the point whose
ball covers the most still-uncovered points (ties at random) and mark those covered. When no point covers
anything new, the rest of the budget is random unlabeled samples.

Bounded memory (issue 29): the graph is never stored. Degrees (uncovered points in each ball) are counted
block by block (Q_CHUNK × DB_CHUNK squared distances at a time, as faiss computes them: ||a||² + ||b||² − 2a·b,
strict < δ²); after a pick, the points it newly covers are taken out of every ball holding them by one more
blocked count over those points only. Each point is newly covered at most once, so the whole greedy costs two
passes over the pairs (the graph's cost) in O(N) memory instead of O(edges): same picks as the sparse graph
before issue 29 (a test compares them; a point is in its own ball even when float rounding says otherwise).
Above `probcover_max_points` (default MAX_POINTS = 50,000) everything — δ, degrees, coverage, candidates — runs on
a seeded uniform subsample of that many pool points (the same for every query of a feature set): coverage of the
subsample is an unbiased estimate of coverage of the pool, and the pair cost stops growing with N (N² pairs
would be 10^12 at N = 1M). The labeled set's coverage is counted with every labeled point, in or out of it. δ comes
from `ctx.options["delta"]`, else from the paper's purity heuristic: k-means (k = num_classes) pseudo-labels; the
ball around x is pure when every point inside shares x's pseudo-label, i.e. when δ ≤ r(x), the distance from x
to its nearest point with another pseudo-label (computed exactly with faiss, k=1 per cluster). Purity(δ) is the
fraction of points with r(x) ≥ δ, a step function of δ, so the largest δ with purity ≥ α = 0.95 is read off
exactly as the ⌈αN⌉-th largest r(x) (no grid: on small pools a 0.05-step grid lands on balls of 1–5 points).

δ is a property of the feature space, not of a query: it is estimated ONCE per feature set (k-means seed 0, so the
same embeddings always give the same δ) and, when the caller gives `ctx.cache_dir` (`alssl query` passes the run's
`features/` dir), stored there as `<sha16 of the embeddings>.probcover.json` and reused by every later query
(`alssl status` prints it). Until issue 16 every query re-estimated δ with a k-means of its own seed (δ 0.86–1.22
over 5 seeds on one pool). When coverage is exhausted (every point is covered), the rest of the budget is random:
one `warning:` line on stderr, and `ctx.info["random_fill"]` holds the count (copied into the query's metadata).
The official code has no such case: it would take `argmax` of an all-zero degree vector, i.e. an already covered
point.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alssl.acquisition.base import (AcquisitionContext, faiss_index, feature_chunks, features_digest, features_of,
                                    fill_random, option)
from alssl.acquisition.typiclust import kmeans_assign
from alssl.errors import UserError

DELTA_SEED = 0  # the purity k-means seed: δ depends on the embeddings only
MIN_DELTA = 1e-6  # a δ of 0 (duplicates) still lets every point cover itself
ALPHA = 0.95
MAX_POINTS = 50_000  # above: work on a seeded subsample of this many pool points
SUBSAMPLE_SEED = 0
Q_CHUNK = 1024  # query rows per distance block
DB_CHUNK = 16384  # pool rows per distance block: one block is Q_CHUNK x DB_CHUNK float32 = 64 MiB


def purity_radius(x: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """[N] distance from each row of x to the nearest row with a different pseudo-label (inf if none)."""
    r = np.full(len(x), np.inf)
    for c in np.unique(pseudo):
        inside, outside = np.flatnonzero(pseudo == c), np.flatnonzero(pseudo != c)
        if len(outside) == 0:
            continue
        index = faiss_index(x.shape[1])
        index.add(np.ascontiguousarray(x[outside]))
        dist, _ = index.search(np.ascontiguousarray(x[inside]), 1)  # [n_c, 1] squared L2
        r[inside] = np.sqrt(np.maximum(dist[:, 0], 0.0))
    return r


def delta_from_radii(r: np.ndarray, alpha: float = ALPHA) -> float:
    """Largest δ with purity(δ) = mean(r ≥ δ) ≥ alpha: the ⌈alpha·N⌉-th largest r, clipped to [MIN_DELTA, 2]."""
    if not 0 < alpha <= 1:
        raise UserError(f"probcover_alpha must be in (0, 1] (got {alpha}); the paper uses 0.95")
    r = np.sort(np.asarray(r, dtype=np.float64))[::-1]  # [N] descending
    return float(np.clip(r[int(np.ceil(alpha * len(r))) - 1], MIN_DELTA, 2.0))


def choose_delta(x: np.ndarray, num_classes: int, *, alpha: float = ALPHA, seed: int = 0) -> float:
    """The purity heuristic's δ under k-means (k = num_classes) pseudo-labels; x must be L2-normalised."""
    pseudo = kmeans_assign(x, max(1, min(num_classes, len(x))), seed=seed)
    return delta_from_radii(purity_radius(x, pseudo), alpha)


def delta_cache_path(cache_dir: Path, embeddings: np.ndarray) -> Path:
    """`cache_dir/<sha16>.probcover.json`, keyed by the bytes of the embeddings (one file per feature set)."""
    return Path(cache_dir) / f"{features_digest(embeddings)}.probcover.json"


def _read_cache(path: Path) -> dict:
    """A δ cache file as {"delta": {key: δ}}; a missing or damaged one (not JSON, δ not a positive finite number) is
    treated as empty, so δ is estimated again and the file rewritten whole."""
    try:
        stored = json.loads(path.read_text())
        deltas = stored["delta"]
        if isinstance(deltas, dict) and all(type(v) in (int, float) and 0 < v < float("inf") for v in deltas.values()):
            return {"delta": dict(deltas)}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        pass
    return {"delta": {}}


def estimated_delta(ctx: AcquisitionContext, xs: np.ndarray, *, alpha: float = ALPHA) -> tuple[float, str]:
    """(δ, "cached" | "estimated"): the purity heuristic's δ on the working rows xs (L2-normalised), computed once
    per feature set and kept in ctx.cache_dir."""
    from alssl.runs import atomic_write_text

    n = len(ctx.embeddings)
    key = f"alpha={alpha:g},classes={ctx.num_classes}" + (f",points={len(xs)}" if len(xs) < n else "")
    path = None if ctx.cache_dir is None else delta_cache_path(ctx.cache_dir, ctx.embeddings)
    stored = _read_cache(path) if path is not None else {"delta": {}}
    if key in stored["delta"]:
        return float(stored["delta"][key]), "cached"
    delta = choose_delta(xs, ctx.num_classes, alpha=alpha, seed=DELTA_SEED)
    if path is not None:
        record = {"n": int(n), "dim": int(ctx.embeddings.shape[1]), "kmeans_seed": DELTA_SEED,
                  "delta": {**stored["delta"], key: delta}}
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    return delta, "estimated"


def ball_counts(queries: np.ndarray, q_ids: np.ndarray | None, xs: np.ndarray, delta: float,
                weights: np.ndarray | None = None, *, axis: int = 1) -> np.ndarray:
    """Counts over the δ-ball relation ||q − x|| < δ, block by block (never more than Q_CHUNK × DB_CHUNK at once).

    axis=1: [len(queries)] number of rows x of `xs` (weighted by `weights` [M] bool, e.g. "still uncovered") in
    each query's ball; axis=0: [M] number of queries whose ball holds each row of xs. `q_ids` are the queries'
    row numbers in xs (None: not in xs): a point is always in its own ball, whatever the float rounding."""
    r2 = float(delta) ** 2
    sq_x = np.einsum("ij,ij->i", xs, xs)  # [M]
    out = np.zeros(len(queries) if axis == 1 else len(xs), np.int64)
    for i in range(0, len(queries), Q_CHUNK):
        q = queries[i : i + Q_CHUNK]
        sq_q = np.einsum("ij,ij->i", q, q)[:, None]  # [q, 1]
        for j in range(0, len(xs), DB_CHUNK):
            d2 = q @ xs[j : j + DB_CHUNK].T  # [q, m] squared L2 as faiss computes it
            d2 *= -2.0
            d2 += sq_q
            d2 += sq_x[None, j : j + DB_CHUNK]
            inside = d2 < r2
            if q_ids is not None:  # self-loops
                ids = np.asarray(q_ids[i : i + Q_CHUNK]) - j
                mine = (ids >= 0) & (ids < inside.shape[1])
                inside[np.flatnonzero(mine), ids[mine]] = True
            if weights is not None:
                inside &= weights[None, j : j + DB_CHUNK]
            if axis == 1:
                out[i : i + len(q)] += inside.sum(1)
            else:
                out[j : j + inside.shape[1]] += inside.sum(0)
    return out


def ball_members(x: np.ndarray, p: int, xs: np.ndarray, delta: float) -> np.ndarray:
    """Row numbers of xs inside the δ-ball of xs[p] (p included)."""
    d2 = np.einsum("ij,ij->i", xs, xs) + x @ x - 2.0 * (xs @ x)  # [M]
    inside = d2 < float(delta) ** 2
    inside[p] = True
    return np.flatnonzero(inside)


def work_rows(n: int, max_points: int) -> np.ndarray:
    """The pool rows ProbCover works on: all of them, or a seeded (SUBSAMPLE_SEED) uniform sample of max_points."""
    if max_points < 1:
        raise UserError(f"probcover_max_points must be at least 1 (got {max_points}); the default is {MAX_POINTS}")
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(n, max_points, replace=False))


def probcover_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices greedily maximising δ-ball coverage of the pool (or of its working subsample)."""
    n = len(ctx.embeddings)
    rows = work_rows(n, option(ctx, "probcover_max_points", MAX_POINTS, int))  # [M] pool rows
    xs = features_of(ctx, rows, normalise=True)  # [M, D]
    delta, source = option(ctx, "delta", None, float), "option"
    if delta is None:
        delta, source = estimated_delta(ctx, xs, alpha=option(ctx, "probcover_alpha", ALPHA, float))
    ctx.info.update(delta=round(float(delta), 6), delta_source=source)
    if len(rows) < n:
        ctx.info["probcover_points"] = int(len(rows))
    if not 0 < delta <= 2:
        raise UserError(f"probcover delta must be in (0, 2] on L2-normalised embeddings (got {delta}); try --delta 0.5")
    covered = np.zeros(len(rows), bool)  # [M] in the ball of a labeled (or picked) point
    in_work = np.full(n, -1, np.int64)
    in_work[rows] = np.arange(len(rows))
    for _, block in feature_chunks(ctx, np.flatnonzero(ctx.labeled), normalise=True):
        covered |= ball_counts(block, None, xs, delta, axis=0) > 0
    covered[in_work[ctx.labeled & (in_work >= 0)]] = True  # a labeled point covers itself
    degree = ball_counts(xs, np.arange(len(rows)), xs, delta, ~covered)  # [M] uncovered points in each ball
    picked: list[int] = []
    for _ in range(budget):
        best = degree.max(initial=0)
        if best <= 0:
            break
        p = int(rng.choice(np.flatnonzero(degree == best)))
        new = ball_members(xs[p], p, xs, delta)
        new = new[~covered[new]]  # points p covers for the first time
        covered[new] = True
        degree -= ball_counts(xs[new], new, xs, delta, axis=0)  # each newly covered j leaves every ball holding it
        picked.append(int(rows[p]))
    why = f"probcover: the labeled set and {len(picked)} picks cover the whole pool at delta={delta:.4g}"
    return fill_random(picked, ctx, budget, rng, why=why)
