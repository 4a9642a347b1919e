"""What a decoded pool costs per image, raw uint8 rows vs JPEG / WebP bytes, and how fast each is turned back into
pixels (issue 28, "pool storage that scales": measured only, the compressed pool is not built yet).

Images: ../shared/data/cifar10_10k.npz resized to S (bilinear, antialiased). Upscaled 32 px images are smoother
than photos, so their JPEG sizes are a lower bound for real photos at the same S. Decoding runs in this one process
(PIL for JPEG / WebP; a row copy for raw); a pool builder would decode in worker processes.

    python bench/pool_storage.py [--n 500] [--sizes 64,224] [--quality 90]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from report import load_average  # noqa: E402  (bench/report.py)

DATA = ROOT.parent / "shared" / "data" / "cifar10_10k.npz"


def images(n: int, size: int) -> np.ndarray:
    with np.load(DATA) as f:
        x = torch.from_numpy(f["x_train"][:n]).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def encode(x: np.ndarray, fmt: str, quality: int) -> list[bytes]:
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, quality=quality)
        out.append(buf.getvalue())
    return out


def decode_rate(blobs: list[bytes]) -> float:
    t = time.perf_counter()
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return len(blobs) / (time.perf_counter() - t)


def raw_rate(x: np.ndarray) -> float:
    raw = x.tobytes()
    row = x[0].nbytes
    t = time.perf_counter()
    for i in range(len(x)):
        np.frombuffer(raw, np.uint8, row, i * row).reshape(x.shape[1:]).copy()
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args()
    print(f"# {a.n} CIFAR-10 images resized, quality {a.quality}, one process, {os.cpu_count()} CPUs, "
          f"load {load_average()}")
    print("| S | format | bytes / image | vs raw | decode img/s (one process) | 10^7 images on disk |")
    print("|---|---|---|---|---|---|")
    for s in [int(v) for v in a.sizes.split(",")]:
        x = images(a.n, s)
        raw = x[0].nbytes
        print(f"| {s} | raw uint8 | {raw:,} | 1.00 | {raw_rate(x):,.0f} | {raw * 1e7 / 1e9:,.0f} GB |")
        for fmt in ("JPEG", "WEBP"):
            blobs = encode(x, fmt, a.quality)
            size = sum(map(len, blobs)) / len(blobs)
            print(f"| {s} | {fmt} q{a.quality} | {size:,.0f} | {size / raw:.3f} | {decode_rate(blobs):,.0f} | "
                  f"{size * 1e7 / 1e9:,.0f} GB |", flush=True)


if __name__ == "__main__":
    main()
