"""Stage-1 throughput: alssl's SimSiam loop vs lightly's documented SimSiam example loop, in one run.

Same backbone (alssl `cnn` by default), heads (lightly SimSiam projection/prediction), loss, optimizer, batch size and
images (`../shared/data/cifar10_10k.npz`, 32 px): both sides train the network and loss of alssl's `SimSiam` method
object (alssl/pretrain_methods.py), so they differ only in how the views are made and fed. The peer is lightly's
example loop (docs "SimSiam" / examples/pytorch/simsiam.py): a map-style dataset of PIL images +
`SimSiamTransform(input_size=32)` + `DataLoader(shuffle, drop_last)`; it is timed with each `--workers` value and the
fastest is the reference. alssl is
timed through `alssl.pretraining.pretrain` (kNN monitor off, checkpoints on) as it ships (the next step's views drawn on
a worker thread while the step trains, alssl/prefetch.py), and once more with that thread off (`alssl inline`), so the
lever is measured alone. The sides alternate for `--rounds` rounds (A B C A B C ...), so a change in background load
hits all; the last line is `ratio=X.XX`, the median over rounds of alssl images/s ÷ the fastest lightly images/s
(min and max on the line before).

    .venv/bin/python bench/pretrain_throughput.py [--steps 30] [--batch-size 256] [--rounds 5]
    python bench/pretrain_throughput.py --device cuda --backbone resnet18 --batch-size 512 --workers 8 \
        --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightly.transforms import SimSiamTransform
from PIL import Image
from torch.utils.data import DataLoader, Dataset as TorchDataset

from alssl.backbones import build_backbone
from alssl.data import load_dataset
from alssl.runs import Run
from alssl.pretraining import pretrain
from alssl.pretrain_methods import SimSiam
from report import load_average, print_ratio, spread  # bench/report.py

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_10k.npz"


class PILDataset(TorchDataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL image -> transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def lightly_loop(x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int, workers: int, backbone: str = "cnn",
                 device: str = "cpu", precision: str = "32-true") -> float:
    """Images/s of lightly's example loop over `steps` batches (after one warm-up batch)."""
    torch.manual_seed(0)
    method = SimSiam()  # alssl's SimSiam: lightly's heads and loss, the network and loss the alssl side trains
    model = method.student(build_backbone(backbone, 3)).to(device)
    method.setup(model, n_pool=len(x))
    method.to(device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * batch_size / 256, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(PILDataset(x, y, SimSiamTransform(input_size=32)), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    done, t0 = -1, 0.0
    while done < steps:
        try:
            (x0, x1), _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
        with autocast:
            loss, _ = method.loss(model, x0, x1, contextlib.nullcontext)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done += 1
        if done == 0:
            _sync(device)
            t0 = time.perf_counter()  # the first batch (worker start-up) is warm-up
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alssl_loop(*, steps: int, batch_size: int, data: str = str(DATA), backbone: str = "cnn", device: str = "cpu",
               precision: str = "32-true", prefetch: bool = True) -> float:
    """Images/s of alssl.pretraining.pretrain on the same data, `steps` batches (kNN monitor off)."""
    ds = load_dataset(data, seed=0)
    n = min((steps + 1) * batch_size, len(ds.y_train))  # one batch more, as warm-up for the loop's first step
    ds.x_train, ds.y_train = ds.x_train[:n], ds.y_train[:n]
    with tempfile.TemporaryDirectory() as tmp:
        run = Run.create(Path(tmp) / "run", n_pool=n, config={})
        summary = pretrain(ds, run, method="simsiam", backbone=backbone, epochs=1, batch_size=batch_size,
                           knn_every=0, quiet=True, accelerator=device.split(":")[0], precision=precision,
                           prefetch=prefetch)
    return summary["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B A B ...)")
    ap.add_argument("--workers", default="0,2", help="lightly DataLoader num_workers values; the fastest is the peer")
    ap.add_argument("--backbone", default="cnn")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="32-true", help="32-true | bf16-mixed (both sides)")
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args()
    with np.load(a.data) as f:
        x, y = f["x_train"], f["y_train"]
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "no GPU"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load average {load_average()}, device {a.device} ({gpu}), {a.precision}")
    print(f"# cifar10_10k 32 px, {a.backbone}, bs {a.batch_size}, {a.steps} steps per side per round, "
          f"{a.rounds} rounds")
    ratios, levers = [], []
    for r in range(a.rounds):
        kw = dict(steps=a.steps, batch_size=a.batch_size, data=a.data, backbone=a.backbone, device=a.device,
                  precision=a.precision)
        ours = alssl_loop(**kw)
        inline = alssl_loop(**kw, prefetch=False)
        peer = {int(w): lightly_loop(x, y, steps=a.steps, batch_size=a.batch_size, workers=int(w), backbone=a.backbone,
                                     device=a.device, precision=a.precision) for w in a.workers.split(",")}
        best = max(peer, key=peer.get)
        ratios.append(ours / peer[best])
        levers.append(ours / inline)
        print(f"round {r}: alssl {ours:8.1f} img/s (inline views {inline:8.1f}) | lightly example " +
              " ".join(f"(num_workers={w}) {v:8.1f}" for w, v in peer.items()) + f" img/s | ratio {ratios[-1]:.2f}",
              flush=True)
    print(f"look-ahead view thread alone: {spread(levers)}")
    print_ratio(ratios)


if __name__ == "__main__":
    main()
