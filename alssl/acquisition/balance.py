"""Class-balanced picks for imbalanced pools, around any strategy (`balance=true`).

On a long-tailed pool a strategy's picks land mostly in the head classes, so the tail stays unlabeled (Aggarwal et al.
2020, "Active Learning for Imbalanced Datasets", WACV; Bengar et al. 2022 study the same long-tail setting). The
wrapper keeps the strategy's judgement and only changes who gets the budget:

1. the strategy is asked for `balance_factor` × B candidates (default 3; the same random stream, so they are a larger
   batch of the same picks), in the order it returns them;
2. each candidate gets the class the linear probe (on the current labels, standardised features) predicts for it; with
   fewer than two labeled classes, its k-means cluster instead (k = number of classes, seed 0);
3. the B picks are handed out one at a time to the predicted class with the fewest labels + picks so far (ties: the
   lower class id), which takes its next candidate in the strategy's order; a class with no candidate left drops out.

So quotas move the labeled set toward equal counts per class, as far as the predictions and the candidates allow; on
a balanced pool with a good probe the picks are close to the strategy's own. `ctx.info["balance"]` records the picks
per predicted class.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from alssl.acquisition.base import AcquisitionContext, features_of, option

FACTOR = 3


def predicted_classes(ctx: AcquisitionContext, rows: np.ndarray) -> np.ndarray:
    """[len(rows)] int64: the linear probe's class for each row, or its k-means cluster before two classes are
    labeled."""
    labeled = np.flatnonzero(ctx.labeled)
    y = np.asarray(ctx.labels)[labeled]
    if len(np.unique(y)) >= 2:
        from alssl.probes import fit_probe

        probe = fit_probe("linear", features_of(ctx, labeled), y, num_classes=ctx.num_classes, seed=0)
        return probe.predict(features_of(ctx, rows))
    from alssl.acquisition.typiclust import kmeans_assign

    return kmeans_assign(features_of(ctx, rows), max(1, min(ctx.num_classes, len(rows))), seed=0)


def balanced(strategy: Callable, ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """`budget` picks of `strategy` under per-class quotas (module doc)."""
    n_free = int((~np.asarray(ctx.labeled)).sum())
    factor = option(ctx, "balance_factor", FACTOR, float)
    ask = int(min(n_free, max(budget, np.ceil(factor * budget))))
    candidates = np.asarray(strategy(ctx, ask, rng), dtype=np.int64)  # in the strategy's order
    classes = predicted_classes(ctx, candidates)
    k = max(ctx.num_classes, int(classes.max()) + 1 if len(classes) else 0)
    have = np.bincount(np.asarray(ctx.labels)[np.asarray(ctx.labeled)], minlength=k)[:k].astype(np.int64)
    queues = {c: list(candidates[classes == c]) for c in np.unique(classes)}
    picks: list[int] = []
    per_class = np.zeros(k, np.int64)
    while len(picks) < budget and queues:
        c = min(queues, key=lambda c: (have[c] + per_class[c], c))
        picks.append(int(queues[c].pop(0)))
        per_class[c] += 1
        if not queues[c]:
            del queues[c]
    ctx.info["balance"] = {str(c): int(n) for c, n in enumerate(per_class) if n}
    return np.asarray(picks, dtype=np.int64)
