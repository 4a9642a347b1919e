"""Stage-1 throughput: alssl's SimSiam loop vs lightly's documented SimSiam example loop, in one run.

Same backbone (alssl `cnn`), heads (lightly SimSiam projection/prediction), loss, optimizer, batch size and images
(`../shared/data/cifar10_10k.npz`, 32 px). The peer is lightly's example (docs "SimSiam" / examples/pytorch/simsiam.py):
a map-style dataset of PIL images + `SimSiamTransform(input_size=32)` + `DataLoader(shuffle, drop_last)`; it is timed
with num_workers 0 and 2 and the faster one is the reference. alssl is timed through `alssl.pretrain.pretrain` (kNN monitor
off, checkpoints on). The last line is `ratio=X.XX` = alssl images/s ÷ lightly images/s.

    .venv/bin/python bench/pretrain_throughput.py [--steps 30] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.transforms import SimSiamTransform
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset

from alssl.backbones import build_backbone
from alssl.data import load_dataset
from alssl.runs import Run
from alssl.pretrain import pretrain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_10k.npz"


class PILDataset(TorchDataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 array -> PIL image -> transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


class LightlySimSiam(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimSiamProjectionHead(backbone.dim, 512, 128)
        self.prediction_head = SimSiamPredictionHead(128, 64, 128)

    def forward(self, x):
        z = self.projection_head(self.backbone(x))
        return z.detach(), self.prediction_head(z)


def lightly_loop(x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int, workers: int) -> float:
    """Images/s of lightly's example loop over `steps` batches (after one warm-up batch)."""
    torch.manual_seed(0)
    model = LightlySimSiam(build_backbone("cnn", 3))
    criterion = NegativeCosineSimilarity()
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
        z0, p0 = model(x0)
        z1, p1 = model(x1)
        loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done += 1
        if done == 0:
            t0 = time.perf_counter()  # the first batch (worker start-up) is warm-up
    return steps * batch_size / (time.perf_counter() - t0)


def alssl_loop(*, steps: int, batch_size: int) -> float:
    """Images/s of alssl.pretrain.pretrain on the same data, `steps` batches (kNN monitor off)."""
    ds = load_dataset(str(DATA), seed=0)
    n = (steps + 1) * batch_size  # one batch more, as warm-up for the loop's first step
    ds.x_train, ds.y_train = ds.x_train[:n], ds.y_train[:n]
    with tempfile.TemporaryDirectory() as tmp:
        run = Run.create(Path(tmp) / "run", n_pool=n, config={})
        summary = pretrain(ds, run, method="simsiam", backbone="cnn", epochs=1, batch_size=batch_size,
                           knn_every=0, quiet=True, accelerator="cpu")
    return summary["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args()
    with np.load(DATA) as f:
        x, y = f["x_train"], f["y_train"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cifar10_10k 32 px, cnn, bs {a.batch_size}, {a.steps} steps")
    peer = {w: lightly_loop(x, y, steps=a.steps, batch_size=a.batch_size, workers=w) for w in (0, 2)}
    for w, v in peer.items():
        print(f"lightly example loop (num_workers={w}): {v:8.1f} img/s")
    ours = alssl_loop(steps=a.steps, batch_size=a.batch_size)
    print(f"alssl loop (kornia views on the batch, no DataLoader): {ours:8.1f} img/s")
    print(f"ratio={ours / max(peer.values()):.2f}")


if __name__ == "__main__":
    main()
