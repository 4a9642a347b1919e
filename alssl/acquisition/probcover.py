"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall 2022, "Active Learning Through a Covering Lens",
arXiv 2205.11320).

On L2-normalised embeddings: the δ-ball graph has an edge i → j when ||x_i − x_j|| < δ (self-loops included, so
a point covers itself). Points covered by the labeled set are removed first; then, B times, pick the point whose
ball covers the most still-uncovered points (ties at random) and mark those covered. When no point covers
anything new, the rest of the budget is random unlabeled samples.

The graph is built chunk by chunk with faiss exact range search into a sparse matrix (never N×N dense). δ comes
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

import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from alssl.acquisition.base import AcquisitionContext, faiss_index, fill_random, l2_normalise, option
from alssl.acquisition.typiclust import kmeans_assign
from alssl.errors import UserError

DELTA_SEED = 0  # the purity k-means seed: δ depends on the embeddings only
MIN_DELTA = 1e-6  # a δ of 0 (duplicates) still lets every point cover itself
ALPHA = 0.95
CHUNK = 2048


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
    digest = hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes()).hexdigest()[:16]
    return Path(cache_dir) / f"{digest}.probcover.json"


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


def estimated_delta(embeddings: np.ndarray, num_classes: int, *, alpha: float = ALPHA,
                    cache_dir: Path | None = None) -> tuple[float, str]:
    """(δ, "cached" | "estimated"): the purity heuristic's δ, computed once per feature set and kept in cache_dir."""
    from alssl.runs import atomic_write_text

    key = f"alpha={alpha:g},classes={num_classes}"
    path = None if cache_dir is None else delta_cache_path(cache_dir, embeddings)
    stored = _read_cache(path) if path is not None else {"delta": {}}
    if key in stored["delta"]:
        return float(stored["delta"][key]), "cached"
    delta = choose_delta(l2_normalise(embeddings), num_classes, alpha=alpha, seed=DELTA_SEED)
    if path is not None:
        record = {"n": int(len(embeddings)), "dim": int(embeddings.shape[1]), "kmeans_seed": DELTA_SEED,
                  "delta": {**stored["delta"], key: delta}}
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    return delta, "estimated"


def ball_graph(x: np.ndarray, delta: float) -> sp.csr_matrix:
    """Sparse [N, N] boolean adjacency, row i = the points j with ||x_i − x_j|| < delta (i included)."""
    index = faiss_index(x.shape[1])
    index.add(x)
    indptr, cols = [np.zeros(1, np.int64)], []
    for i in range(0, len(x), CHUNK):
        lims, _, nbrs = index.range_search(np.ascontiguousarray(x[i : i + CHUNK]), float(delta) ** 2)  # squared radius
        indptr.append(lims[1:].astype(np.int64) + indptr[-1][-1])
        cols.append(nbrs.astype(np.int32 if len(x) < 2**31 else np.int64))
    indptr = np.concatenate(indptr)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    return sp.csr_matrix((np.ones(len(cols), bool), cols, indptr), shape=(len(x), len(x)))


def probcover_select(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices greedily maximising δ-ball coverage of the pool."""
    x = l2_normalise(ctx.embeddings)  # [N, D]
    delta, source = option(ctx, "delta", None, float), "option"
    if delta is None:
        delta, source = estimated_delta(ctx.embeddings, ctx.num_classes, cache_dir=ctx.cache_dir,
                                        alpha=option(ctx, "probcover_alpha", ALPHA, float))
    ctx.info.update(delta=round(float(delta), 6), delta_source=source)
    if not 0 < delta <= 2:
        raise UserError(f"probcover delta must be in (0, 2] on L2-normalised embeddings (got {delta}); try --delta 0.5")
    graph = ball_graph(x, delta)  # [N, N] sparse, out-edges
    into = graph.T.tocsr()  # [N, N] sparse, row j = the points whose ball holds j
    covered = np.zeros(len(x), bool)
    covered[graph[np.flatnonzero(ctx.labeled)].indices] = True
    degree = np.asarray(graph @ (~covered).astype(np.int64)).ravel()  # [N] uncovered points in each ball
    picked: list[int] = []
    for _ in range(budget):
        best = degree.max(initial=0)
        if best <= 0:
            break
        p = int(rng.choice(np.flatnonzero(degree == best)))
        new = graph.indices[graph.indptr[p] : graph.indptr[p + 1]]
        new = new[~covered[new]]  # points p covers for the first time
        covered[new] = True
        degree -= np.bincount(into[new].indices, minlength=len(x))  # each newly covered j leaves every ball holding it
        picked.append(p)
    why = f"probcover: the labeled set and {len(picked)} picks cover the whole pool at delta={delta:.4g}"
    return fill_random(picked, ctx, budget, rng, why=why)
