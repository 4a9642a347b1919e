"""Acquisition study on digits: each strategy's linear-probe accuracy over seeds vs random, cumulative rounds.

    python bench/acq_digits.py [--features pixels|pca|cnn|run:RUN] [--fractions 0.01,0.02] [--seeds 5]
                               [--strategies random,typiclust,...] [--probe linear|svm]

Protocol (as `alssl curve`): for each (strategy, seed) a chain of cumulative rounds (the 2 % set extends the 1 %
set); model-based strategies (entropy, margin, svm-margin, vaal) take their first round from `random` with the
same rng stream, so their first round IS random's; after each round a probe is fitted on the labeled
embeddings and scored on the test split. Features:
- `pixels`: the 64 raw pixel values (digits are 8×8);
- `pca`:    PCA of the centred pixels, 32 components (a cheap fixed embedding);
- `cnn`:    a random-init `alssl.backbones.SmallCNN` (seed 0), 128-d;
- `run:RUN`: the frozen stage-1 features of a run (`alssl pretrain --data digits --out RUN`), e.g. SimSiam.
Prints a markdown table (mean ± std in %, and the mean difference to random in points).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alssl.acquisition import NEEDS_LABELS, STRATEGIES, AcquisitionContext, select  # noqa: E402
from alssl.data import Dataset, load_dataset  # noqa: E402
from alssl.probes import fit_probe  # noqa: E402
from alssl.rounds import strategy_rng  # noqa: E402

ORDER = ["random", "entropy", "margin", "svm-margin", "kcenter", "vaal", "typiclust", "probcover", "badge",
         "cluster-margin"]


def features(kind: str, d: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train [N, D], test [M, D]) float32 features of the given kind."""
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    if kind == "pixels":
        return flat(d.x_train), flat(d.x_test)
    if kind == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(32, random_state=0).fit(flat(d.x_train))
        return pca.transform(flat(d.x_train)).astype(np.float32), pca.transform(flat(d.x_test)).astype(np.float32)
    if kind == "cnn":
        import torch

        from alssl.backbones import SmallCNN
        from alssl.feature_sets import embed

        torch.manual_seed(0)
        model = SmallCNN(d.channels)
        return (embed(model, d.x_train, mean=d.mean, std=d.std), embed(model, d.x_test, mean=d.mean, std=d.std))
    if kind.startswith("run:"):
        from alssl.feature_sets import pool_features

        return pool_features(Path(kind[4:]), d)
    raise SystemExit(f"unknown --features {kind!r}; use pixels, pca, cnn or run:RUN")


def study(d: Dataset, train: np.ndarray, test: np.ndarray, strategies: list[str], fractions: list[float],
          seeds: int, probe: str = "linear", options: dict | None = None) -> dict[tuple[str, int], list[float]]:
    """{(strategy, round): [test accuracy per seed]}."""
    counts = [max(1, round(f * len(train))) for f in fractions]
    out: dict[tuple[str, int], list[float]] = {}
    for name in strategies:
        for seed in range(seeds):
            labeled = np.zeros(len(train), bool)
            for k, target in enumerate(counts):
                use = "random" if name in NEEDS_LABELS and not labeled.any() else name
                ctx = AcquisitionContext(embeddings=train, labeled=labeled, labels=np.where(labeled, d.y_train, -1),
                                         num_classes=d.num_classes, images=d.x_train, probe=probe,
                                         options=dict(options or {}))
                labeled = labeled.copy()
                labeled[select(use, ctx, target - int(labeled.sum()), strategy_rng(seed, k, use))] = True
                idx = np.flatnonzero(labeled)
                model = fit_probe(probe, train[idx], d.y_train[idx], num_classes=d.num_classes, seed=seed)
                out.setdefault((name, k), []).append(model.accuracy(test, d.y_test))
    return out


def table(res: dict, strategies: list[str], fractions: list[float], counts: list[int]) -> str:
    head = " | ".join(f"{100 * f:g} % ({n} labels)" for f, n in zip(fractions, counts))
    lines = [f"| strategy | {head} |", "|---|" + "---|" * len(fractions)]
    for name in strategies:
        cells = []
        for k in range(len(fractions)):
            acc = 100 * np.asarray(res[name, k])
            diff = acc.mean() - 100 * np.mean(res["random", k]) if ("random", k) in res else float("nan")
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f} ({diff:+.1f})" if name != "random"
                         else f"{acc.mean():.1f} ± {acc.std():.1f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", default="pixels")
    ap.add_argument("--fractions", default="0.01,0.02")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", default=",".join(ORDER))
    ap.add_argument("--probe", default="linear")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    for s in strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    if "random" not in strategies:
        strategies = ["random", *strategies]
    fractions = [float(f) for f in args.fractions.split(",")]
    d = load_dataset("digits")
    train, test = features(args.features, d)
    t0 = time.perf_counter()
    res = study(d, train, test, strategies, fractions, args.seeds, probe=args.probe)
    counts = [max(1, round(f * len(train))) for f in fractions]
    print(f"digits, features={args.features} ({train.shape[1]}-d), probe={args.probe}, {args.seeds} seeds, "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(res, strategies, fractions, counts))


if __name__ == "__main__":
    main()
