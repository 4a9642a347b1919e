"""Stage-1 training speed of each backbone at each image size on this machine: SimSiam steps (two kornia views,
forward + backward + SGD step), measured side by side in one run, rounds interleaved so background load hits all.
With `--embed`: frozen-feature extraction instead (eval mode, no grad), what `--epochs 0` runs and every embedding
of the pool costs.

    python scripts/backbone_speed.py [--batch 32 --steps 3 --rounds 3 --sizes 32,64,128 --backbones cnn,...]
    python scripts/backbone_speed.py --embed --sizes 112,224 --backbones timm:vit_small_patch14_dinov2.lvd142m

Prints one row per (backbone, size): median images/s over rounds. It compares no peer (so it is not in bench/):
the table in docs/pretrain.md, which backbone and size a machine can afford.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from alssl.augment import SSLView  # noqa: E402
from alssl.backbones import build_backbone  # noqa: E402
from alssl.pretrain_methods import SimSiam  # noqa: E402

DEFAULT = "cnn,resnet18,wrn28_2,torchvision:resnet18,torchvision:resnet50,torchvision:convnext_tiny,timm:resnet18"


def step_time(name: str, size: int, batch: int, steps: int) -> float:
    """Seconds per SimSiam step (after one warm-up step)."""
    torch.manual_seed(0)
    method = SimSiam()
    net = method.student(build_backbone(name, 3)).to(memory_format=torch.channels_last)
    method.setup(net, n_pool=batch)
    view = SSLView(size, 3, (0.5,) * 3, (0.25,) * 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x0 = view(x).contiguous(memory_format=torch.channels_last)
        x1 = view(x).contiguous(memory_format=torch.channels_last)
        loss, _ = method.loss(net, x0, x1, contextlib.nullcontext)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def embed_time(name: str, size: int, batch: int, steps: int) -> float:
    """Seconds per batch of frozen features (after one warm-up batch)."""
    torch.manual_seed(0)
    net = build_backbone(name, 3).eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        net(x)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="32,64,128")
    p.add_argument("--backbones", default=DEFAULT)
    p.add_argument("--embed", action="store_true", help="time frozen-feature extraction instead of training steps")
    args = p.parse_args()
    timer = embed_time if args.embed else step_time
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cells = [(b, s) for b in args.backbones.split(",") for s in map(int, args.sizes.split(","))]
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for _ in range(args.rounds):
        for b, s in cells:
            rates[(b, s)].append(args.batch / timer(b, s, args.batch, args.steps))
    what = "frozen features" if args.embed else "SimSiam training"
    print(f"{'backbone':28s} {'size':>5s} {'img/s':>8s}  ({what}, batch {args.batch}, median of {args.rounds} rounds)")
    for b, s in cells:
        print(f"{b:28s} {s:5d} {statistics.median(rates[(b, s)]):8.1f}")


if __name__ == "__main__":
    main()
