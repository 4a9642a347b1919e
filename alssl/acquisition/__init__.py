"""Stage 3: acquisition strategies, `fn(ctx, budget, rng) -> int64 [budget]` absolute pool indices.

Bengar et al. 2021 (arXiv 2108.11458) compare entropy, k-center greedy, VAAL and SVM min-margin against random
on top of a frozen self-supervised backbone; TypiClust and ProbCover are the low-budget strategies that came
after; BADGE and Cluster-Margin the batch-aware ones (uncertain and diverse). `select()` is the entry point: it
validates the request, dispatches (skipping near-duplicates when asked), and checks the answer.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from alssl.acquisition.badge import badge_select
from alssl.acquisition.balance import balanced
from alssl.acquisition.base import OPTIONS, AcquisitionContext, random_sampling, require_labels
from alssl.acquisition.cluster_margin import cluster_margin_select
from alssl.acquisition.duplicates import select_skipping_duplicates
from alssl.acquisition.kcenter import kcenter_greedy
from alssl.acquisition.probcover import probcover_select
from alssl.acquisition.typiclust import typiclust_select
from alssl.acquisition.uncertainty import entropy, margin, svm_margin
from alssl.acquisition.vaal import vaal_select
from alssl.errors import UserError, unknown

Strategy = Callable[[AcquisitionContext, int, np.random.Generator], np.ndarray]

STRATEGIES: dict[str, Strategy] = {
    "random": random_sampling,
    "entropy": entropy,
    "margin": margin,
    "svm-margin": svm_margin,
    "kcenter": kcenter_greedy,
    "vaal": vaal_select,
    "typiclust": typiclust_select,
    "probcover": probcover_select,
    "badge": badge_select,
    "cluster-margin": cluster_margin_select,
}
NEEDS_LABELS: set[str] = {"entropy", "margin", "svm-margin", "vaal", "badge", "cluster-margin"}

__all__ = ["AcquisitionContext", "NEEDS_LABELS", "OPTIONS", "STRATEGIES", "select"]


def _check_context(ctx: AcquisitionContext) -> None:
    n = len(ctx.labeled)
    shape = tuple(ctx.embeddings.shape)  # never np.asarray(embeddings): they may be a big memmap
    labeled, labels = np.asarray(ctx.labeled), np.asarray(ctx.labels)
    if len(shape) != 2 or shape[0] != n or len(labels) != n or labeled.dtype != bool:
        raise UserError(f"acquisition context is inconsistent: embeddings {shape}, labeled {labeled.shape} "
                        f"({labeled.dtype}), labels {labels.shape}; all must cover the same N pool samples")
    if labeled.any() and (labels[labeled].min() < 0 or labels[labeled].max() >= ctx.num_classes):
        raise UserError(f"labeled samples must carry labels in 0..{ctx.num_classes - 1}; check the run's labels")
    for key in ctx.options:
        if key not in OPTIONS:
            raise unknown("acquisition option", key, OPTIONS)


def flag(ctx: AcquisitionContext, key: str) -> bool:
    """A true/false option as a bool (True, "true", "1", "on" / False, "false", "0", "off"; default off)."""
    value = ctx.options.get(key, False)
    if isinstance(value, str):
        if value.lower() not in ("true", "1", "on", "yes", "false", "0", "off", "no"):
            raise UserError(f"acquisition option {key}={value!r} is not true or false; {OPTIONS[key]}")
        return value.lower() in ("true", "1", "on", "yes")
    return bool(value)


def skip_duplicates(ctx: AcquisitionContext) -> bool:
    return flag(ctx, "skip_duplicates")


def select(name: str, ctx: AcquisitionContext, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Run strategy `name`: exactly `budget` unique, previously unlabeled absolute indices (int64)."""
    if name not in STRATEGIES:
        raise unknown("strategy", name, STRATEGIES)
    _check_context(ctx)
    n_free = int((~ctx.labeled).sum())
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise UserError(f"budget must be a whole number of samples (got {budget!r}); e.g. --budget 50 or --budget 2%")
    if budget < 1:
        raise UserError(f"budget must be at least 1 sample (got {budget}); e.g. --budget 50 or --budget 2%")
    if budget > n_free:
        raise UserError(f"budget {budget} is more than the {n_free} unlabeled samples left; ask for at most {n_free}")
    if name in NEEDS_LABELS:
        require_labels(ctx, name)
    strategy = STRATEGIES[name]
    if flag(ctx, "balance"):  # per-class quotas around the strategy's picks (alssl/acquisition/balance.py)
        strategy = functools.partial(balanced, strategy)
    if skip_duplicates(ctx):
        picked = select_skipping_duplicates(strategy, ctx, int(budget), rng)
    else:
        picked = np.asarray(strategy(ctx, int(budget), rng), dtype=np.int64)
    if picked.shape != (budget,) or len(np.unique(picked)) != budget:
        raise AssertionError(f"strategy {name} returned {picked.shape} / {len(np.unique(picked))} unique, not {budget}")
    if picked.min() < 0 or picked.max() >= len(ctx.labeled) or ctx.labeled[picked].any():
        raise AssertionError(f"strategy {name} returned an index outside the unlabeled pool")
    return picked
