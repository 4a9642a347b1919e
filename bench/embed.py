"""Embedding throughput and peak memory: alssl's pool embedding vs a plain torchvision DataLoader + model loop.

Both sides embed the same on-disk pool (uint8 [N, S, S, C] in a `.npy`, as `alssl pretrain` decodes an image folder;
built here from ../shared/data/cifar10_10k.npz cycled to N, or random pixels with --synthetic) with the same frozen
backbone (alssl `cnn` by default, seeded random init) and the same normalisation, batch size, device and precision:
- alssl: `alssl.feature_sets.embed_to_file` as `alssl query/probe/export` run it: the pool read batch by batch
  (os.pread) by a background thread while the model runs, each output batch written into the memory-mapped
  `.npy` in place;
- the peer: what a torchvision user writes: a map-style Dataset over `np.load(mmap_mode="r")` with
  `transforms.v2` (ToImage, ToDtype(scale=True), Normalize) per item, `DataLoader(num_workers=W)`, a
  `torch.no_grad()` model loop that collects the outputs and `torch.cat`s them.
The sides alternate for --rounds rounds (A B A B ...); the last line is `ratio=X.XX`, the median over rounds of
alssl img/s ÷ peer img/s. Peak RSS of each side is measured once in a fresh subprocess (VmHWM).
`--scale 20000,200000` also prints alssl's img/s and peak RSS at each N (one subprocess each): docs/scale.md's table.

    python bench/embed.py [--n 10000] [--size 32] [--rounds 3] [--workers 2]
    python bench/embed.py --device cuda --precision bf16-mixed --backbone resnet18 --batch-size 1024 --workers 8
    python bench/embed.py --synthetic --size 16 --scale 20000,200000,1000000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from alssl import devices as dev  # noqa: E402
from alssl.backbones import build_backbone  # noqa: E402
from alssl.data import compute_mean_std  # noqa: E402
from alssl.data.folder import DiskPool  # noqa: E402
from alssl.feature_sets import _new_npy, embed_to_file  # noqa: E402
from report import load_average, print_ratio  # noqa: E402  (bench/report.py)

DATA = ROOT.parent / "shared" / "data" / "cifar10_10k.npz"


def make_pool(path: Path, n: int, size: int, synthetic: bool) -> None:
    """uint8 [n, size, size, 3] in a .npy, written in chunks (never the whole pool in memory)."""
    if synthetic or not DATA.exists():
        src = np.random.default_rng(0).integers(0, 256, (4096, size, size, 3), dtype=np.uint8)
    else:
        with np.load(DATA) as f:
            x = torch.from_numpy(f["x_train"]).permute(0, 3, 1, 2)
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        src = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    offset = _new_npy(path, (n, size, size, 3), np.dtype(np.uint8))
    with open(path, "r+b") as f:
        f.seek(offset)
        for i in range(0, n, len(src)):
            f.write(src[: min(len(src), n - i)].tobytes())


class NpyRows(TorchDataset):
    """The peer's dataset: one image per item from the memory-mapped .npy, through torchvision transforms."""

    def __init__(self, path: Path, mean, std):
        self.path, self.x = path, None
        self.n = len(np.load(path, mmap_mode="r"))
        self.tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.x is None:  # opened in each worker
            self.x = np.load(self.path, mmap_mode="r")
        return self.tf(np.array(self.x[i]))  # a writable copy (torch warns on read-only arrays)


def model_for(a) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(a.backbone, 3).eval()


def run_alssl(a, pool: Path, out: Path, mean, std) -> float:
    """img/s of alssl's embedding of the pool into `out`."""
    model = model_for(a)
    setting = dev.Devices(a.device, 1, a.precision)
    t = time.perf_counter()
    feats = embed_to_file(model, DiskPool(pool), out, mean=mean, std=std, batch_size=a.batch_size, setting=setting)
    dt = time.perf_counter() - t
    assert feats.shape[0] == len(DiskPool(pool))
    return len(feats) / dt


@torch.no_grad()
def run_peer(a, pool: Path, mean, std) -> float:
    """img/s of the plain DataLoader + model loop (features gathered in memory, as such loops do)."""
    device = torch.device(a.device)
    model = model_for(a).to(device)
    loader = DataLoader(NpyRows(pool, mean, std), batch_size=a.batch_size, num_workers=a.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16-mixed" else torch.autocast(
        device.type, enabled=False)
    t = time.perf_counter()
    outs = []
    for xb in loader:
        with amp:
            outs.append(model(xb.to(device, non_blocking=True)).float().cpu())
    feats = torch.cat(outs).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(feats) / (time.perf_counter() - t)


def child(a) -> None:
    """One side once, in this fresh process: `img/s peak_rss_bytes` on stdout."""
    pool, tmp = Path(a.pool), Path(a.tmp)
    with open(tmp / "stats.txt") as f:
        mean, std = [tuple(map(float, line.split())) for line in f.read().splitlines()]
    rate = (run_alssl(a, pool, tmp / f"child-{os.getpid()}.npy", mean, std) if a.child == "alssl"
            else run_peer(a, pool, mean, std))
    print(f"{rate:.1f} {peak_rss()}")


def peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM on Linux (ru_maxrss would carry the forking parent's peak over
    exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def in_subprocess(a, side: str, pool: Path, tmp: Path) -> tuple[float, int]:
    args = [sys.executable, __file__, "--child", side, "--pool", str(pool), "--tmp", str(tmp), "--backbone",
            a.backbone, "--batch-size", str(a.batch_size), "--device", a.device, "--precision", a.precision,
            "--workers", str(a.workers)]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    rate, rss = r.stdout.split()
    for f in tmp.glob("child-*.npy"):
        f.unlink()
    return float(rate), int(rss)


def prepare(a, tmp: Path, n: int) -> Path:
    pool = tmp / f"pool-{n}.npy"
    make_pool(pool, n, a.size, a.synthetic)
    mean, std = compute_mean_std(DiskPool(pool))
    (tmp / "stats.txt").write_text(" ".join(map(str, mean)) + "\n" + " ".join(map(str, std)) + "\n")
    return pool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="pool size")
    ap.add_argument("--size", type=int, default=32, help="image size S")
    ap.add_argument("--synthetic", action="store_true", help="random pixels instead of CIFAR-10 images")
    ap.add_argument("--backbone", default="cnn")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B A B ...)")
    ap.add_argument("--workers", type=int, default=2, help="the peer's DataLoader num_workers")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both sides)")
    ap.add_argument("--precision", default="32-true", help="32-true | bf16-mixed (both sides)")
    ap.add_argument("--scale", default="", help="comma-separated pool sizes: alssl img/s and peak RSS at each")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pool", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}), {os.cpu_count()} CPUs, load {load_average()}, device {a.device}")
    print(f"# pool {a.n} x {a.size} px ({'random pixels' if a.synthetic else 'CIFAR-10 cycled'}), {a.backbone}, "
          f"bs {a.batch_size}, {a.precision}, peer DataLoader num_workers={a.workers}, {a.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="alssl-bench-embed-") as d:
        tmp = Path(d)
        for n in [int(s) for s in a.scale.split(",") if s.strip()]:
            pool = prepare(a, tmp, n)
            rate, rss = in_subprocess(a, "alssl", pool, tmp)
            print(f"scale N={n}: alssl {rate:8.1f} img/s, peak RSS {rss / 2**20:.0f} MB")
            pool.unlink()
        if a.rounds == 0:
            return
        pool = prepare(a, tmp, a.n)
        mean, std = [tuple(map(float, line.split())) for line in (tmp / "stats.txt").read_text().splitlines()]
        with torch.no_grad():  # warm-up (oneDNN / cuDNN kernel selection) outside the timed rounds, for both sides
            model_for(a).to(a.device)(torch.zeros(a.batch_size, 3, a.size, a.size, device=a.device))
        ratios = []
        for r in range(a.rounds):
            ours = run_alssl(a, pool, tmp / "features.npy", mean, std)
            peer = run_peer(a, pool, mean, std)
            ratios.append(ours / peer)
            print(f"round {r}: alssl {ours:8.1f} img/s | torchvision DataLoader(num_workers={a.workers}) "
                  f"{peer:8.1f} img/s | x{ours / peer:.2f}", flush=True)
        for side in ("alssl", "peer"):
            rate, rss = in_subprocess(a, side, pool, tmp)
            print(f"peak RSS {side}: {rss / 2**20:.0f} MB (one fresh process, {rate:.1f} img/s; the peer's "
                  f"DataLoader workers are separate processes, not counted)" if side == "peer" else
                  f"peak RSS {side}: {rss / 2**20:.0f} MB (one fresh process, {rate:.1f} img/s)")
    print_ratio(ratios)


if __name__ == "__main__":
    main()
