"""k-center greedy (Sener & Savarese 2018, "Active Learning for CNNs: A Core-Set Approach", arXiv 1708.00489).

Farthest-first traversal in L2 over the embeddings: repeatedly pick the unlabeled point farthest from every
labeled or already picked point (a 2-approximation of the k-center problem).

Implementation (exact, O(N) extra memory, never an N×N matrix):
- initial squared distance of every point to its nearest labeled point: faiss exact search, k=1 (GPU index when
  faiss sees a GPU);
- each greedy step is ONE streaming pass over the embeddings: d = ||x||² + ||c||² − 2 x·c as a float32 BLAS
  matrix-vector product into a preallocated [N] buffer (||x||² precomputed once), clamped at 0, then an
  in-place minimum update;
- a candidate that is an exact duplicate of its nearest centre (distance 0 up to float32 rounding) is skipped,
  never picked while any point is still at distance > 0; once every remaining distance is 0 the rest of the
  budget is filled with random unlabeled samples;
- nothing labeled: the first centre is a uniformly random unlabeled sample.
The embeddings are read block by block through `feature_chunks` (FEATURE_CHUNK rows at a time), so a memory-mapped
feature matrix is streamed from disk and nothing but O(N) vectors is added to it.
"""

from __future__ import annotations

import numpy as np

from alssl.acquisition.base import AcquisitionContext, faiss_index, feature_chunks, features_of, fill_random


def initial_min_sq_dist(ctx: AcquisitionContext, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared distance [N] float32 of every pool row to its nearest centre row, that centre's index [N] int64)."""
    index = faiss_index(ctx.embeddings.shape[1])
    index.add(np.ascontiguousarray(features_of(ctx, centres)))
    min_dist, nearest = np.empty(len(ctx.embeddings), np.float32), np.empty(len(ctx.embeddings), np.int64)
    for idx, block in feature_chunks(ctx):
        dist, nn = index.search(block, 1)  # [n, 1] each
        min_dist[idx], nearest[idx] = np.maximum(dist[:, 0], 0.0), centres[nn[:, 0]]
    return min_dist, nearest


def kcenter_greedy(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """B unlabeled indices by greedy farthest-first traversal from the labeled set."""
    n = len(ctx.embeddings)
    sq_norm = np.empty(n, np.float32)  # [N]
    for idx, block in feature_chunks(ctx):
        sq_norm[idx] = np.einsum("ij,ij->i", block, block)
    buf = np.empty(n, np.float32)  # [N] distances to the newest centre
    closer = np.empty(n, bool)

    def add_centre(c: int) -> None:
        centre = features_of(ctx, np.array([c]))[0]  # [D]
        for idx, block in feature_chunks(ctx):  # one streaming pass, block by block
            np.matmul(block, centre, out=buf[idx[0] : idx[-1] + 1])
        np.multiply(buf, -2.0, out=buf)
        np.add(buf, sq_norm, out=buf)
        np.add(buf, sq_norm[c], out=buf)
        np.maximum(buf, 0.0, out=buf)  # rounding can give tiny negatives
        np.less(buf, min_dist, out=closer)
        np.copyto(min_dist, buf, where=closer)
        np.copyto(nearest, c, where=closer)
        min_dist[c] = 0.0

    picked: list[int] = []
    if ctx.labeled.any():
        min_dist, nearest = initial_min_sq_dist(ctx, np.flatnonzero(ctx.labeled))
        min_dist[ctx.labeled] = 0.0
    else:
        min_dist = np.full(n, np.inf, np.float32)
        nearest = np.full(n, -1, np.int64)
        first = int(rng.choice(ctx.unlabeled_indices))
        picked.append(first)
        add_centre(first)
    while len(picked) < budget:
        p = int(np.argmax(min_dist))
        if not min_dist[p] > 0.0:
            break  # every remaining point coincides with a centre
        if np.array_equal(*features_of(ctx, np.array([p, nearest[p]]))):
            min_dist[p] = 0.0  # exact duplicate of a centre seen through float32 rounding; it covers nothing
            continue
        picked.append(p)
        add_centre(p)
    return fill_random(picked, ctx, budget, rng, why="kcenter: only copies of chosen centres are left")
