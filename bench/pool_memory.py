"""Peak resident memory of an image-folder pool: building it and pretraining on it, at two pool sizes.

    python bench/pool_memory.py [--sizes 5000,50000 --image-size 64 --steps 5]

For each size N: a folder of N PNG files (CIFAR-10 images from ../shared/data/cifar10_10k.npz at 64×64, cycled
with flips so every file differs; made once under /tmp and reused), then in a fresh subprocess each:
1. `alssl pretrain --data FOLDER --epochs 0` — builds RUN/pool (scan, header pass, 2 decode workers) and exits;
2. `alssl pretrain --epochs 1` on a new run dir holding (hard links to) that decoded pool, stopped by the fault hook
   (`ALSSL_FAULT_AFTER_STEPS`) after `--steps` SimSiam steps of batch 256: training reads its batches from disk.
Printed: the peak RSS (ru_maxrss of the largest process: the command or one decode worker) and the pool's bytes.
If memory does not grow with the pool, the 50k rows stay flat while the pool grows 10×.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_10k.npz"


def make_folder(folder: Path, n: int) -> None:
    from PIL import Image

    done = folder / ".complete"
    if done.exists() and done.read_text() == str(n):
        return
    shutil.rmtree(folder, ignore_errors=True)
    with np.load(CIFAR) as f:
        x = f["x_train"]
    for i in range(n):
        a = x[i % len(x)]
        a = a[:, ::-1] if (i // len(x)) % 2 else a  # a flipped copy on every other pass over the 10k
        d = folder / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(a)).resize((64, 64), Image.BILINEAR).save(d / f"{i:06d}.png")
    done.write_text(str(n))


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS MB of the largest descendant, exit code) of one command in a fresh process."""
    code = ("import resource, subprocess, sys, json, time; t=time.time(); "
            "r=subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps([time.time()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, r]))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    import json

    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,50000")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scratch", default="/tmp/alssl-bench-memory")
    args = p.parse_args()
    alssl = [sys.executable, "-m", "alssl"]
    print(f"# load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for n in map(int, args.sizes.split(",")):
        folder = Path(args.scratch) / f"photos{n}"
        make_folder(folder, n)
        run_dir = Path(args.scratch) / f"run{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        s1, rss1, rc1 = run([*alssl, "pretrain", "--data", str(folder), "--out", str(run_dir), "--epochs", "0",
                             "--image-size", str(args.image_size), "--workers", "2", "-q"])
        pool_mb = (run_dir / "pool" / "pixels.npy").stat().st_size / 1e6
        train_dir = Path(args.scratch) / f"train{n}"  # a new run that finds the decoded pool already in place
        shutil.rmtree(train_dir, ignore_errors=True)
        train_dir.mkdir(parents=True)
        shutil.copytree(run_dir / "pool", train_dir / "pool", copy_function=os.link)
        s2, rss2, rc2 = run([*alssl, "pretrain", "--data", str(folder), "--out", str(train_dir), "--epochs", "1",
                             "--image-size", str(args.image_size), "--batch-size", "256", "--knn-every", "0", "-q"],
                            env={"ALSSL_FAULT_AFTER_STEPS": str(args.steps)})
        print(f"N={n:6d}  pool {pool_mb:7.1f} MB | build: {s1:6.1f} s, peak RSS {rss1:6.0f} MB (exit {rc1}) | "
              f"{args.steps} pretrain steps from disk: {s2:6.1f} s, peak RSS {rss2:6.0f} MB (exit {rc2}: -9 = stopped "
              f"by the fault hook as planned)")


if __name__ == "__main__":
    main()
