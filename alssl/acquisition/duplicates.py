"""Near-duplicates: never pay twice for one image.

Two pool images are near-duplicates when the cosine similarity of their features, centred on the pool mean, is at
least τ (`duplicate_tau`, default TAU = 0.98). Centring matters: ReLU features are all positive, so raw cosines
of unrelated images are high (with raw cosines, the folder test of 16 noise photos, 6 saved twice, on a
random-init CNN got a query holding only 14 of the 16 photos: unrelated ones counted as copies); centred, exact
copies still score 1 and unrelated images spread around 0.
Lower τ for re-encodes and crops, raise it for finer classes. The
groups are the connected components of that relation (faiss range search on L2-normalised features: exact up to
EXACT_MAX_N = 50,000 points; above, an inverted-file index with 4·√N lists and 16 probed, which finds pairs that
close with high probability; no N×N matrix either way). They belong to the feature set: computed once, kept in
`ctx.cache_dir/<sha16>.duplicates-<τ>.npy` with a one-line JSON summary that `alssl status` reports.

With `skip_duplicates` on, `select()` runs the strategy and walks its picks in order, dropping any pick whose
group already holds a labeled image or an earlier pick; when that leaves fewer than B, the strategy is asked again
for a larger batch (same random stream), up to the whole pool. If only near-duplicates of labeled or picked images
are left, the rest is random among them, with one `warning:` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from alssl.acquisition.base import AcquisitionContext, feature_chunks, features_digest, l2_normalise, option
from alssl.errors import UserError, warn

TAU = 0.98
EXACT_MAX_N = 50_000
NPROBE = 16


def _centred_blocks(ctx: AcquisitionContext, mean: np.ndarray, rows: np.ndarray | None = None):
    """(row indices, L2-normalised block − mean) over the pool or the given rows."""
    for idx, block in feature_chunks(ctx, rows):
        yield idx, l2_normalise(block - mean)


def _pairs_index(ctx: AcquisitionContext, mean: np.ndarray):
    """A faiss inner-product index holding the centred, L2-normalised pool (exact, or IVF above EXACT_MAX_N)."""
    import faiss

    n, d = ctx.embeddings.shape
    if n <= EXACT_MAX_N:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))
        index.train(np.concatenate([b for _, b in _centred_blocks(ctx, mean, rows)]))
        index.nprobe = NPROBE
    for _, block in _centred_blocks(ctx, mean):
        index.add(block)
    return index


def duplicate_groups(ctx: AcquisitionContext, tau: float = TAU) -> np.ndarray:
    """[N] int64 group id of every pool image (connected components of cosine ≥ tau on the centred features);
    singletons have their own."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    if not 0 < tau <= 1:
        raise UserError(f"duplicate_tau must be in (0, 1] (got {tau}); the default is {TAU}")
    n = len(ctx.embeddings)
    mean = sum(block.sum(0, dtype=np.float64) for _, block in feature_chunks(ctx)) / n  # [D]
    mean = mean.astype(np.float32)
    index = _pairs_index(ctx, mean)
    rows, cols = [], []
    for idx, block in _centred_blocks(ctx, mean):
        lims, _, nbrs = index.range_search(block, float(tau) - 1e-6)  # similarity > radius
        rows.append(np.repeat(idx, np.diff(lims).astype(np.int64)))
        cols.append(nbrs)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def summary(groups: np.ndarray) -> dict:
    """{"groups": near-duplicate groups (2+ images), "images": images in them}."""
    sizes = np.bincount(groups)
    return {"groups": int((sizes > 1).sum()), "images": int(sizes[sizes > 1].sum())}


def cached_groups(ctx: AcquisitionContext, tau: float) -> np.ndarray:
    """duplicate_groups, computed once per feature set and τ and kept in ctx.cache_dir."""
    from alssl.runs import atomic_write_bytes, atomic_write_text

    path = None
    if ctx.cache_dir is not None:
        path = Path(ctx.cache_dir) / f"{features_digest(ctx.embeddings)}.duplicates-{tau:g}.npy"
        if path.exists():
            return np.load(path)
    groups = duplicate_groups(ctx, tau)
    if path is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, groups)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(path.with_suffix(".json"), json.dumps({"tau": tau, "pool": int(len(groups)),
                                                                 **summary(groups)}))
    return groups


def select_skipping_duplicates(strategy: Callable, ctx: AcquisitionContext, budget: int,
                               rng: np.random.Generator) -> np.ndarray:
    """The strategy's picks with near-duplicates of labeled or earlier picked images dropped (see module doc)."""
    groups = cached_groups(ctx, option(ctx, "duplicate_tau", TAU, float))
    n_free = int((~ctx.labeled).sum())
    start = rng.bit_generator.state
    ask = budget
    while True:
        rng.bit_generator.state = start  # the same stream for every ask: a larger batch, not another draw
        taken = np.zeros(groups.max() + 1, bool)
        taken[groups[ctx.labeled]] = True
        keep, dropped = [], 0
        for i in np.asarray(strategy(ctx, ask, rng), dtype=np.int64):
            if taken[groups[i]]:
                dropped += 1
                continue
            taken[groups[i]] = True
            keep.append(int(i))
            if len(keep) == budget:
                break
        if len(keep) == budget or ask == n_free:
            break
        ask = min(n_free, 2 * ask + (budget - len(keep)))
    ctx.info["duplicates_skipped"] = dropped
    if len(keep) < budget:
        free = ~ctx.labeled
        free[keep] = False
        extra = rng.choice(np.flatnonzero(free), size=budget - len(keep), replace=False)
        warn(f"only near-duplicates of labeled or picked images are left; {len(extra)} of the {budget} picks are "
             "random among them")
        keep += extra.tolist()
    return np.asarray(keep, dtype=np.int64)
