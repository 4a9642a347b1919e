"""Ingest: decode + resize a folder of photos into a uint8 pool. alssl's pool builder vs torchvision's ImageFolder +
DataLoader (num_workers 2), over the same 10k-file folder, in one run.

    python bench/ingest.py [--n 10000 --size 64 --rounds 3 --workers 2 --folder /tmp/alssl-bench-photos]

The folder (made once, then reused): CIFAR-10 images from ../shared/data/cifar10_10k.npz upscaled to photo sizes
(256×192 .. 640×480) in class subfolders so ImageFolder can read it: `--mix mixed` (default) 70 % JPEG (quality 90),
20 % PNG, 10 % WebP; `--mix jpeg` every file a JPEG, as a camera folder.
- alssl: `alssl.data.folder.build_pool` — scan, header pass, parallel decode (JPEG draft mode: libjpeg decodes at
  1/2–1/8 scale) straight into the on-disk pool, manifest; `--workers` processes.
- peer: `ImageFolder(root, Compose([Resize(S), CenterCrop(S), PILToTensor()]))` through a `DataLoader` with the same
  number of workers, batches copied into one preallocated uint8 array (the same result: every image at S×S).
Each side runs in its own subprocess, alternating A B A B ... (`--rounds` each), so background load hits both alike;
the peak RSS printed is that subprocess's (largest single process: the parent or one worker). Last line:
`ratio=X.XX` = the median over rounds of (peer seconds / alssl seconds), with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import load_average, print_ratio  # noqa: E402  (bench/report.py)
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_10k.npz"
SIZES = [(256, 192), (320, 240), (400, 300), (480, 360), (640, 480), (192, 256), (480, 640)]


def make_folder(folder: Path, n: int, mix: str = "mixed") -> None:
    """n photo-sized files in class subfolders (reused when a complete folder is already there).

    mix "mixed": 70 % JPEG, 20 % PNG, 10 % WebP; "jpeg": every file a JPEG (what a camera or phone folder holds)."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists() and done.read_text() == f"{n} {mix}":
        return
    shutil.rmtree(folder, ignore_errors=True)
    with np.load(CIFAR) as f:
        x, y, classes = f["x_train"][:n], f["y_train"][:n], list(f["classes"])
    for i, (a, label) in enumerate(zip(x, y)):
        d = folder / str(classes[int(label)])
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(a).resize(SIZES[i % len(SIZES)], Image.BICUBIC)
        kind = i % 10 if mix == "mixed" else 0
        if kind < 7:
            im.save(d / f"{i:05d}.jpg", quality=90)
        elif kind < 9:
            im.save(d / f"{i:05d}.png")
        else:
            im.save(d / f"{i:05d}.webp", quality=90)
    done.write_text(f"{n} {mix}")


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # Linux: KiB


def side_alssl(args) -> dict:
    from alssl.data.folder import build_pool

    out = Path(args.scratch) / "pool"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = build_pool(Path(args.folder), out, image_size=args.size, strict=False, workers=args.workers, quiet=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "images": len(m["pool"])}


def side_peer(args) -> dict:
    import torch
    from torchvision import datasets, transforms

    t0 = time.perf_counter()
    tf = transforms.Compose([transforms.Resize(args.size), transforms.CenterCrop(args.size), transforms.PILToTensor()])
    ds = datasets.ImageFolder(args.folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=args.workers, shuffle=False)
    pool = np.empty((len(ds), args.size, args.size, 3), np.uint8)
    i = 0
    for xb, _ in loader:
        pool[i : i + len(xb)] = xb.permute(0, 2, 3, 1).numpy()
        i += len(xb)
    return {"seconds": time.perf_counter() - t0, "images": i}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mix", choices=["mixed", "jpeg"], default="mixed",
                   help="file formats of the folder (see make_folder)")
    p.add_argument("--folder", default=None, help="default /tmp/alssl-bench-photos-MIX")
    p.add_argument("--scratch", default="/tmp/alssl-bench-scratch")
    p.add_argument("--side", choices=["alssl", "peer"])
    args = p.parse_args()
    args.folder = args.folder or f"/tmp/alssl-bench-photos-{args.mix}"
    if args.side:
        res = (side_alssl if args.side == "alssl" else side_peer)(args)
        print(json.dumps({**res, "peak_rss_mb": round(peak_rss_mb(), 1)}))
        return
    from importlib.metadata import version  # not `import torch`: a child forked from a process holding torch would
    # report that process's memory as its own peak RSS (Linux keeps the pre-exec high-water mark in ru_maxrss)

    print(f"# torch {version('torch')}, pillow {version('pillow')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cpus={os.cpu_count()}, "
          f"load average {load_average()}, {platform.processor() or platform.machine()}")
    t0 = time.perf_counter()
    make_folder(Path(args.folder), args.n, args.mix)
    nbytes = sum(f.stat().st_size for f in Path(args.folder).rglob("*") if f.is_file())
    print(f"# folder {args.folder} ({args.mix}): {args.n} files, {nbytes / 1e6:.0f} MB "
          f"(ready in {time.perf_counter() - t0:.0f} s); "
          f"target {args.size}px, {args.workers} workers each")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"alssl": [], "peer": []}
    for r in range(args.rounds):
        for side in ("alssl", "peer"):
            out = subprocess.run([sys.executable, __file__, "--side", side, *sys.argv[1:]], capture_output=True,
                                 text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(res)
            print(f"round {r} {side:5s}: {res['seconds']:.2f} s ({res['images'] / res['seconds']:.0f} img/s), "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB")
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(results["alssl"], results["peer"])]
    for side in ("alssl", "peer"):
        med = statistics.median(r["seconds"] for r in results[side])
        print(f"{side}: median {med:.2f} s = {args.n / med:.0f} img/s, peak RSS "
              f"{max(r['peak_rss_mb'] for r in results[side]):.0f} MB")
    print_ratio(ratios)


if __name__ == "__main__":
    main()
