"""What a decoded pool costs per image in each storage format, and how fast batches come back out of it (issue 28,
"pool storage that scales"), with alssl's own pool builder and readers.

For each S in --sizes and each format (raw uint8 rows: `DiskPool`; JPEG quality 90: `JpegPool`) the bench builds a
pool with `alssl.data.folder.build_pool(..., pool_format=FMT)` from one folder of photo-sized JPEGs (CIFAR-10 images
from ../shared/data/cifar10_10k.npz upscaled to 256×192 .. 640×480: bench/ingest.py's `--mix jpeg` folder), then:
- bytes / image: the pool's pixel files (raw: pixels.npy; JPEG: pixels.jpegs + pixels-offsets.npy) ÷ N;
- read img/s: the whole pool read in shuffled batches of --batch (what a training epoch does), decoded on the
  calling thread (`threads=1`) and by the pool's decode threads (`threads=--threads`, default alssl's: the CPU
  count up to 8), --rounds rounds each, median;
- peak RSS of reading one batch: a fresh process opens the pool and reads one batch; VmHWM before and after;
- mean |JPEG - raw|: the mean absolute difference of the JPEG pool's pixels from the raw pool's (0..255 levels);
- with --embed: end to end, img/s of `alssl.feature_sets.embed_to_file` (what query / probe / export run: the next batch
  read, and decoded, by a background thread while the model runs) with the `cnn` backbone on one torch thread,
  raw and JPEG alternating for --rounds rounds, median: whether decoding shows behind the model.
Upscaled 32 px images are smoother than photos, so the JPEG sizes are a lower bound for real photos at the same S.

    python bench/pool_storage.py [--n 1000] [--sizes 64,224] [--batch 256] [--rounds 3] [--threads 0] [--embed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ingest import make_folder  # noqa: E402  (bench/ingest.py)
from report import load_average  # noqa: E402  (bench/report.py)

from alssl.data.folder import JPEGS, OFFSETS, PIXELS, build_pool, default_workers, open_pixels  # noqa: E402

RSS_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {root!r})
from alssl.data.folder import open_pixels

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

pool_dir = Path({pool!r})
pool = open_pixels(pool_dir, json.loads((pool_dir / "manifest.json").read_text()))
before = hwm()
batch = pool[np.random.default_rng(0).permutation(len(pool))[:{batch}]]
print(json.dumps({{"before": before, "after": hwm(), "batch_mb": batch.nbytes / 2**20}}))
"""


def read_rate(pool, batch: int, seed: int) -> float:
    """img/s of reading the whole pool in shuffled batches."""
    order = np.random.default_rng(seed).permutation(len(pool))
    t = time.perf_counter()
    for i in range(0, len(order), batch):
        pool[order[i : i + batch]]
    return len(order) / (time.perf_counter() - t)


def embed_rate(pool, out: Path, mean, std, batch: int) -> float:
    """img/s of alssl's embedding of the pool (`cnn`, seeded random init, CPU, one torch thread)."""
    import torch

    from alssl import devices as dev
    from alssl.backbones import build_backbone
    from alssl.feature_sets import embed_to_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_backbone("cnn", pool.shape[3]).eval()
    t = time.perf_counter()
    embed_to_file(model, pool, out, mean=mean, std=std, batch_size=batch, setting=dev.Devices("cpu", 1, "32-true"))
    rate = len(pool) / (time.perf_counter() - t)
    out.unlink()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="decode threads (0: alssl's default)")
    ap.add_argument("--folder", default="/tmp/alssl-bench-photos-jpeg")
    ap.add_argument("--keep", action="store_true", help="keep the built pools")
    ap.add_argument("--embed", action="store_true", help="also embed each pool (cnn, CPU): end-to-end img/s")
    a = ap.parse_args()
    threads = a.threads or default_workers()
    folder = Path(a.folder)
    make_folder(folder, a.n, "jpeg")
    work = Path(f"/tmp/alssl-bench-pools-{os.getpid()}")
    print(f"# {a.n} photo-sized JPEGs (CIFAR-10 upscaled), batches of {a.batch}, {os.cpu_count()} CPUs, "
          f"{threads} decode threads, load {load_average()}")
    print(f"| S | format | bytes / image | vs raw | mean abs diff from raw | build s | read img/s, 1 thread | "
          f"read img/s, {threads} threads | peak RSS: process / + one batch ({a.batch}) | 10^7 images on disk |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for s in [int(v) for v in a.sizes.split(",")]:
            raw_bytes = s * s * 3
            raw_pixels = None
            for fmt in ("raw", "jpeg"):
                pool_dir = work / f"{fmt}-{s}"
                t = time.perf_counter()
                m = build_pool(folder, pool_dir, image_size=s, strict=False, workers=default_workers(), quiet=True,
                               pool_format=fmt)
                build_s = time.perf_counter() - t
                files = (PIXELS,) if fmt == "raw" else (JPEGS, OFFSETS)
                per_image = sum((pool_dir / f).stat().st_size for f in files) / len(m["pool"])
                pool = open_pixels(pool_dir, m)
                if raw_pixels is None:
                    raw_pixels, diff = np.load(pool_dir / PIXELS, mmap_mode="r"), 0.0
                else:
                    diff = float(np.mean([np.abs(pool[i : i + 256].astype(np.int16) - raw_pixels[i : i + 256]).mean()
                                          for i in range(0, len(pool), 256)]))
                rates = {}
                for k in (1, threads):
                    pool.threads = k  # (a DiskPool has no threads: a row copy either way)
                    read_rate(pool, a.batch, 99)  # warm the page cache
                    rates[k] = statistics.median(read_rate(pool, a.batch, r) for r in range(a.rounds))
                rss = json.loads(subprocess.run(
                    [sys.executable, "-c", RSS_SCRIPT.format(root=str(ROOT), pool=str(pool_dir), batch=a.batch)],
                    capture_output=True, text=True, check=True).stdout)
                print(f"| {s} | {fmt}{' q' + str(m['jpeg_quality']) if fmt == 'jpeg' else ''} | {per_image:,.0f} | "
                      f"{per_image / raw_bytes:.3f} | {diff:.2f} | {build_s:.1f} | {rates[1]:,.0f} | "
                      f"{rates[threads]:,.0f} | {rss['before']:.0f} MB / +{rss['after'] - rss['before']:.0f} MB "
                      f"(batch {rss['batch_mb']:.0f} MB) | {per_image * 1e7 / 1e9:,.0f} GB |", flush=True)
            if a.embed:
                pools = {fmt: (open_pixels(work / f"{fmt}-{s}", m), m) for fmt in ("raw", "jpeg")
                         for m in [json.loads((work / f"{fmt}-{s}" / "manifest.json").read_text())]}
                rates = {"raw": [], "jpeg": []}
                for _ in range(a.rounds):
                    for fmt, (pool, m) in pools.items():
                        rates[fmt].append(embed_rate(pool, work / "features.npy", m["mean"], m["std"], a.batch))
                print(f"# embed, {s} px, cnn, 1 torch thread, batch {a.batch}: raw "
                      f"{statistics.median(rates['raw']):,.0f} img/s, jpeg {statistics.median(rates['jpeg']):,.0f} "
                      f"img/s (rounds: raw {[round(v) for v in rates['raw']]}, "
                      f"jpeg {[round(v) for v in rates['jpeg']]})",
                      flush=True)
            if not a.keep:
                shutil.rmtree(work / f"raw-{s}")
                shutil.rmtree(work / f"jpeg-{s}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# load after: {load_average()}")


if __name__ == "__main__":
    main()
