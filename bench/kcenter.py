"""k-center greedy: alssl's streaming implementation vs the common reference coreset loop, same data, same run.

    python bench/kcenter.py [--n 50000 --d 512 --labeled 100 --budget 1000 --seed 0]

Reference (the loop most PyTorch coreset code uses, e.g. DISTIL's CoreSet): initial distances
`torch.cdist(X, X[labeled]).min(1)`, then per step `torch.cdist(X, X[[c]])` over the full pool and a min-update.
alssl (`alssl/acquisition/kcenter.py`): faiss for the initial distances, then one float32 matrix-vector pass per
step. Both start from the same labeled set; the picks are compared (float32 rounding may reorder near-ties).
Each runs in its own subprocess (alssl first): its peak RSS (ru_maxrss) is its own, and torch's and numpy's
thread pools never compete inside one process. Floor: one streaming pass `X @ v`, timed in the alssl process.
A few steps of scikit-learn's `pairwise_distances` (the other common reference) are timed for information.
Last line: `ratio=X.XX` = reference time / alssl time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(n: int, d: int, labeled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)  # [N, D], no float64 temporary
    return x, rng.choice(n, size=labeled, replace=False)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """alssl's kcenter on the bench data; prints one JSON line and saves the picks."""
    import faiss  # noqa: F401  (imported before the RSS baseline: the library's own pages are not kcenter's memory)

    from alssl.acquisition import AcquisitionContext
    from alssl.acquisition.kcenter import kcenter_greedy

    x, lab_idx = make_data(args.n, args.d, args.labeled, args.seed)
    labeled = np.zeros(args.n, bool)
    labeled[lab_idx] = True
    ctx = AcquisitionContext(embeddings=x, labeled=labeled, labels=np.where(labeled, 0, -1), num_classes=1)
    base = rss_mb()  # imports + embeddings, before any kcenter work
    kcenter_greedy(ctx, 1, np.random.default_rng(0))  # warm-up (faiss / BLAS thread pools)
    t0 = time.perf_counter()
    picks = kcenter_greedy(ctx, args.budget, np.random.default_rng(0))
    total = time.perf_counter() - t0
    t_init = []  # initial distances + 1 step, best of 3: per step = (total - this) / (budget - 1)
    for _ in range(3):
        t0 = time.perf_counter()
        kcenter_greedy(ctx, 1, np.random.default_rng(0))
        t_init.append(time.perf_counter() - t0)
    np.save(args.child, picks)
    print(json.dumps({"total_s": total, "init_s": min(t_init), "base_rss_mb": base, "peak_rss_mb": rss_mb(),
                      "floor_ms": floor_ms(x)}))


def floor_ms(x: np.ndarray, reps: int = 50) -> float:
    """One streaming pass over the matrix, X @ v into a preallocated [N]: the memory-bandwidth floor of a step."""
    v = np.random.default_rng(1).standard_normal(x.shape[1], dtype=np.float32)
    buf = np.empty(len(x), np.float32)
    np.matmul(x, v, out=buf)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.matmul(x, v, out=buf)
    return (time.perf_counter() - t0) / reps * 1e3


def reference_child(args: argparse.Namespace) -> None:
    """The reference loop in its own process (torch's thread pool never shares a process with numpy's BLAS)."""
    x, lab_idx = make_data(args.n, args.d, args.labeled, args.seed)
    picks, total, init = reference_kcenter(x, lab_idx, args.budget)
    np.save(args.child, np.asarray(picks))
    print(json.dumps({"total_s": total, "init_s": init, "sklearn_step_ms": sklearn_step_ms(x)}))


def reference_kcenter(x: np.ndarray, lab_idx: np.ndarray, budget: int) -> tuple[list[int], float, float]:
    """The common torch coreset loop; returns (picks, total seconds, initial-distance seconds)."""
    import torch

    xt = torch.from_numpy(x)
    t0 = time.perf_counter()
    min_d = torch.cdist(xt, xt[torch.from_numpy(lab_idx)]).min(1).values  # [N]
    t_init = time.perf_counter() - t0
    picks = []
    for _ in range(budget):
        c = int(torch.argmax(min_d))
        picks.append(c)
        min_d = torch.minimum(min_d, torch.cdist(xt, xt[c : c + 1])[:, 0])  # full pool to the new centre
    return picks, time.perf_counter() - t0, t_init


def sklearn_step_ms(x: np.ndarray, steps: int = 3) -> float:
    from sklearn.metrics import pairwise_distances

    min_d = np.full(len(x), np.inf)
    t0 = time.perf_counter()
    for c in range(steps):
        min_d = np.minimum(min_d, pairwise_distances(x, x[[c]]).ravel())
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--labeled", type=int, default=100)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return reference_child(args) if args.reference else child(args)

    def run(reference: bool) -> tuple[dict, np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "picks.npy"
            cmd = [sys.executable, __file__, "--n", str(args.n), "--d", str(args.d), "--labeled", str(args.labeled),
                   "--budget", str(args.budget), "--seed", str(args.seed), "--child", str(out)]
            res = subprocess.run(cmd + (["--reference"] if reference else []), capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{'reference' if reference else 'alssl'} subprocess failed:\n{res.stderr}")
            return json.loads(res.stdout.strip().splitlines()[-1]), np.load(out)

    ours, ours_picks = run(reference=False)
    ref, ref_picks = run(reference=True)
    ref_total, ref_init = ref["total_s"], ref["init_s"]
    x, lab_idx = make_data(args.n, args.d, args.labeled, args.seed)
    diverge = np.flatnonzero(ref_picks != ours_picks)
    first = int(diverge[0]) if len(diverge) else args.budget
    if first < args.budget:  # only a float32 near-tie may explain a different pick: check it in float64
        x64 = x.astype(np.float64)
        centres = np.r_[lab_idx, ours_picks[:first]]
        gap = [np.sqrt(((x64[centres] - x64[p]) ** 2).sum(1)).min() for p in (ref_picks[first], ours_picks[first])]
        assert abs(gap[0] - gap[1]) <= 1e-4 * max(gap), f"step {first}: picks differ beyond rounding ({gap})"
    sk_ms, floor = ref["sklearn_step_ms"], ours["floor_ms"]

    emb_mb = x.nbytes / 2**20
    per_step = (ours["total_s"] - ours["init_s"]) / max(1, args.budget - 1) * 1e3
    ref_step = (ref_total - ref_init) / args.budget * 1e3
    extra = ours["peak_rss_mb"] - ours["base_rss_mb"]
    print(f"k-center greedy  N={args.n} D={args.d} labeled={args.labeled} budget={args.budget} "
          f"(cpus={os.cpu_count()}; shared machine, timings include contention)")
    print(f"{'impl':<30}{'total s':>10}{'init s*':>10}{'ms/step':>10}")
    print(f"{'reference (torch.cdist loop)':<30}{ref_total:>10.2f}{ref_init:>10.2f}{ref_step:>10.2f}")
    print(f"{'alssl (faiss + X@c)':<30}{ours['total_s']:>10.2f}{ours['init_s']:>10.2f}{per_step:>10.2f}")
    print(f"{'sklearn pairwise (3 steps)':<30}{'':>10}{'':>10}{sk_ms:>10.2f}")
    print(f"{'floor (one X@v pass)':<30}{'':>10}{'':>10}{floor:>10.2f}")
    print("* alssl: initial distances + first step (best of 3); reference: initial distances only")
    print(f"picks_same_position={args.budget - len(diverge)}/{args.budget} first_divergence="
          + (f"{first} (float32 near-tie, checked in float64)" if first < args.budget else "none"))
    print(f"per_step_ms={per_step:.2f} floor_ms={floor:.2f} step_over_floor={per_step / floor:.2f}")
    print(f"peak_rss_mb={ours['peak_rss_mb']:.1f} (before kcenter {ours['base_rss_mb']:.1f}, "
          f"kcenter extra {extra:.1f}) "
          f"embeddings_mb={emb_mb:.1f} (embeddings+extra)/embeddings={(emb_mb + extra) / emb_mb:.2f}")
    print(f"ratio={ref_total / ours['total_s']:.2f}")


if __name__ == "__main__":
    main()
