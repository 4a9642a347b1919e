"""Acquisition at scale: seconds and peak RSS of every feature-based strategy at growing pool sizes.

    python bench/acq_scale.py [--sizes 10000,100000,1000000] [--strategies random,entropy,...] [--d 512]
                              [--budget 1000] [--labeled 0.01] [--timeout 1800] [--small]

Data: synthetic features, 10 Gaussian blobs in D dimensions (centres N(0, 1), unit noise, float32, seed 0); the
blob is the label; a random `--labeled` fraction of the pool is labeled (1 %: the model-based strategies need a
probe). Each (strategy, N) runs in its own subprocess, so its peak RSS (ru_maxrss) is its own: `base` is the
process after imports and data, `peak` its maximum over the whole run (data included). Seconds = one `select()`
call, everything the strategy does (probe fit, clustering, δ estimate: no cache is warm). VAAL is left out (it
trains on images, not features). `--small` is a seconds-long smoke run (N = 300 and 1,000, D = 16, B = 10).

Prints one markdown table (seconds and peak RSS per strategy and N, the growth exponent of the seconds between
the two largest sizes, and, at N = 1,000,000, whether issue 29's goal on a CPU is met), then the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import load_average  # noqa: E402

STRATEGIES = ["random", "entropy", "margin", "svm-margin", "kcenter", "typiclust", "probcover", "badge",
              "cluster-margin"]
GOAL_S = {"random": 30, "entropy": 30, "margin": 30, "typiclust": 600, "probcover": 600, "cluster-margin": 600,
          "badge": 600, "kcenter": 900}  # issue 29, CPU, N = 1M, B = 1000
GOAL_RSS_MB = 8 * 1024


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_pool(n: int, d: int, labeled: float, seed: int = 0):
    """(features [N, D] float32, labels [N], labeled mask [N]): 10 blobs, built in place (no float64 copy)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, d), dtype=np.float32)
    y = rng.integers(0, 10, n)
    x = rng.standard_normal((n, d), dtype=np.float32)
    for i in range(0, n, 65536):
        x[i : i + 65536] += centres[y[i : i + 65536]]
    mask = np.zeros(n, bool)
    mask[rng.choice(n, max(10, int(round(labeled * n))), replace=False)] = True
    return x, y, mask


def child(args: argparse.Namespace) -> None:
    """One strategy on one pool size; prints one JSON line."""
    import faiss  # noqa: F401  (imported before the baseline, as every strategy module would)

    from alssl.acquisition import AcquisitionContext, select

    x, y, mask = make_pool(args.n, args.d, args.labeled)
    ctx = AcquisitionContext(embeddings=x, labeled=mask, labels=np.where(mask, y, -1), num_classes=10)
    base = rss_mb()
    t0 = time.perf_counter()
    picked = select(args.strategy, ctx, args.budget, np.random.default_rng(0))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_rss_mb": base, "peak_rss_mb": rss_mb(), "picked": len(picked),
                      "random_fill": ctx.info.get("random_fill", 0),
                      "info": {k: v for k, v in ctx.info.items() if k != "random_fill"}}))


def run_one(strategy: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--strategy", strategy, "--n", str(n), "--d", str(args.d),
           "--budget", str(args.budget), "--labeled", str(args.labeled)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def exponent(t1: float, t2: float, n1: int, n2: int) -> str:
    return f"{math.log(t2 / t1) / math.log(n2 / n1):.2f}" if t1 > 0 and t2 > 0 else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--labeled", type=float, default=0.01)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (strategy, N) before it counts as failed")
    ap.add_argument("--small", action="store_true", help="smoke run: N = 300, 1000; D = 16; B = 10")
    ap.add_argument("--json", type=Path, help="also write every result to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.small:
        args.sizes, args.d, args.budget = "300,1000", 16, 10
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    print(f"# acq_scale: D={args.d} B={args.budget} labeled={args.labeled:g} sizes={sizes} load={load_average()}",
          flush=True)
    results: dict[str, dict[int, dict]] = {}
    for n in sizes:
        for s in strategies:
            r = run_one(s, n, args)
            results.setdefault(s, {})[n] = r
            print(f"# {s} N={n}: {json.dumps(r)}", flush=True)
    head = " | ".join(f"N={n:,}: s / peak MB" for n in sizes)
    print(f"\n| strategy | {head} | exponent | goal at 1M (CPU) |")
    print("|---" * (len(sizes) + 3) + "|")
    for s in strategies:
        cells, rows = [], results[s]
        for n in sizes:
            r = rows[n]
            cells.append(r["error"] if "error" in r else f"{r['seconds']:.2f} / {r['peak_rss_mb']:.0f}")
        ok = [n for n in sizes if "error" not in rows[n]]
        exp = exponent(rows[ok[-2]]["seconds"], rows[ok[-1]]["seconds"], ok[-2], ok[-1]) if len(ok) >= 2 else "–"
        goal = "–"
        if 1_000_000 in rows and s in GOAL_S:
            r = rows[1_000_000]
            goal = ("not run: " + r["error"]) if "error" in r else (
                "met" if r["seconds"] <= GOAL_S[s] and r["peak_rss_mb"] <= GOAL_RSS_MB else
                f"missed (goal {GOAL_S[s]} s, {GOAL_RSS_MB / 1024:.0f} GB)")
        print(f"| {s} | " + " | ".join(cells) + f" | {exp} | {goal} |")
    print(f"\nload={load_average()}")
    if args.json:
        args.json.write_text(json.dumps({s: {str(n): r for n, r in v.items()} for s, v in results.items()}, indent=1))
    if any("error" in r for v in results.values() for r in v.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
