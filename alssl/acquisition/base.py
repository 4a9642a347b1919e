"""The context every strategy reads and the small helpers they share.

One index space (DESIGN.md): `embeddings`, `labeled`, `labels` and `images` all cover the WHOLE training pool,
and every strategy returns absolute pool indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from alssl.errors import UserError, warn

# Strategy knobs a caller may put in `AcquisitionContext.options` (anything else is refused with a suggestion).
OPTIONS = {
    "kernel": "svm kernel for svm-margin and for entropy/margin with probe='svm': linear | rbf (default linear)",
    "delta": "probcover ball radius on L2-normalised embeddings (default: purity heuristic)",
    "probcover_alpha": "probcover purity threshold for choosing delta (default 0.95)",
    "typiclust_max_clusters": "typiclust's cap on the number of k-means clusters (default 500)",
    "typiclust_knn": "typiclust's K for typicality (default 20)",
    "typiclust_kmeans": "typiclust's k-means: auto | sklearn | faiss (default auto: sklearn up to 50,000 points)",
    "probcover_max_points": "probcover works on a seeded subsample of at most this many pool points (default 50000)",
    "cluster_margin_candidates": "cluster-margin's margin candidates as a multiple of the budget (default 10)",
    "cluster_margin_clusters": "cluster-margin's number of HAC clusters (default: pool size / 20, 2..1000)",
    "vaal_epochs": "VAAL training length in passes over the pool (default 2; official 100)",
    "vaal_batch_size": "VAAL batch size for each of the labeled and unlabeled batches (default 64; official 128)",
    "vaal_width": "VAAL conv width of the first layer, doubled at each downsampling (default 32; official 128)",
    "skip_duplicates": "never pick a near-duplicate of a labeled or already picked image: true | false (default false; "
                       "alssl query: true for pools of image files)",
    "duplicate_tau": "cosine similarity at which two images count as near-duplicates (default 0.98)",
    "balance": "per-class quotas around any strategy for imbalanced pools: true | false (default false)",
    "balance_factor": "with balance: candidates asked of the strategy, as a multiple of the budget (default 3)",
    "device": "torch device for VAAL (default: cuda when available, else cpu)",
}


@dataclass
class AcquisitionContext:
    """What a strategy sees: frozen features of the whole pool plus the current labeled set."""

    embeddings: np.ndarray  # float32 [N, D]
    labeled: np.ndarray  # bool [N]
    labels: np.ndarray  # int64 [N], -1 where unlabeled
    num_classes: int
    images: np.ndarray | None = None  # uint8 [N, H, W, C], for VAAL
    probe: str = "linear"
    options: dict = field(default_factory=dict)
    cache_dir: Path | None = None  # where a strategy may keep per-feature-set state (a run's features/ dir)
    info: dict = field(default_factory=dict)  # what the strategy reports back (delta, random_fill), JSON values

    @property
    def unlabeled_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.labeled)


FEATURE_CHUNK = 32768  # rows per block read from the embeddings (64 MiB at D = 512, float32)


def feature_chunks(ctx: AcquisitionContext, rows: np.ndarray | None = None, *, normalise: bool = False,
                   chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The one accessor every strategy reads its features through: (row indices [n], float32 block [n, D]) over
    the whole pool (`rows=None`, in order) or the given rows, `chunk` (default FEATURE_CHUNK) rows at a time,
    optionally L2-normalised.

    Only one block is in memory at a time, so a memory-mapped `ctx.embeddings` is read from disk block by block."""
    n, chunk = len(ctx.embeddings), chunk or FEATURE_CHUNK
    for i in range(0, n if rows is None else len(rows), chunk):
        idx = np.arange(i, min(i + chunk, n)) if rows is None else np.asarray(rows[i : i + chunk])
        block = np.asarray(ctx.embeddings[i : i + len(idx)] if rows is None else ctx.embeddings[idx], np.float32)
        yield idx, (l2_normalise(block) if normalise else block)


def features_of(ctx: AcquisitionContext, rows: np.ndarray, *, normalise: bool = False) -> np.ndarray:
    """float32 [len(rows), D]: the features of a (small) set of rows, gathered through `feature_chunks`."""
    blocks = [block for _, block in feature_chunks(ctx, np.asarray(rows), normalise=normalise)]
    return np.concatenate(blocks) if blocks else np.zeros((0, ctx.embeddings.shape[1]), np.float32)


def features_digest(embeddings: np.ndarray) -> str:
    """sha256 (16 hex digits) of the float32 bytes of the embeddings, read block by block: names per-feature-set
    caches (`RUN/features/<digest>.*`)."""
    h = hashlib.sha256()
    for i in range(0, len(embeddings), FEATURE_CHUNK):
        h.update(np.ascontiguousarray(embeddings[i : i + FEATURE_CHUNK], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def require_labels(ctx: AcquisitionContext, name: str) -> None:
    """Model-based strategies cannot start from nothing (Bengar'21 start every method from a random round)."""
    if not ctx.labeled.any():
        raise UserError(f"strategy {name} needs labeled samples to start; label a first round chosen with "
                        "`--strategy random` (e.g. `alssl query RUN --budget 1% --strategy random`)")


def option(ctx: AcquisitionContext, key: str, default, kind=float):
    """A knob from ctx.options, converted with `kind`; a bad value is a UserError naming the knob."""
    value = ctx.options.get(key, default)
    if value is None:
        return default
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"acquisition option {key}={value!r} is not a valid {kind.__name__}; {OPTIONS[key]}") from None
    return out


def lowest(scores: np.ndarray, candidates: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The `budget` candidates with the lowest scores; ties broken at random (not by index order)."""
    order = rng.permutation(len(candidates))
    keep = order[np.argsort(scores[order], kind="stable")[:budget]]
    return candidates[keep].astype(np.int64)


def fill_random(picked: list[int], ctx: AcquisitionContext, budget: int, rng: np.random.Generator, *,
                why: str = "the method ran dry") -> np.ndarray:
    """Top `picked` up to `budget` with random unlabeled, not yet picked samples (used when a method runs dry).

    Records the number of random picks in `ctx.info["random_fill"]` and, when there are any, says so in one
    `warning:` line on stderr."""
    picked_arr = np.asarray(picked, dtype=np.int64)
    n_random = budget - len(picked_arr)
    ctx.info["random_fill"] = int(n_random)
    if n_random > 0:
        free = ~ctx.labeled
        free[picked_arr] = False
        extra = rng.choice(np.flatnonzero(free), size=n_random, replace=False)
        picked_arr = np.concatenate([picked_arr, extra.astype(np.int64)])
        warn(f"{why}; {n_random} of the {budget} picks are random unlabeled samples")
    return picked_arr


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalised float32 copy (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # [N, 1]
    return x / np.maximum(norm, 1e-12)


def faiss_index(d: int):
    """An exact L2 index, on the GPU when faiss sees one."""
    import faiss

    index = faiss.IndexFlatL2(d)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def random_sampling(ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random sampling from the unlabeled pool: the baseline every curve compares to."""
    return rng.choice(ctx.unlabeled_indices, size=budget, replace=False).astype(np.int64)
