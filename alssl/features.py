"""Frozen-backbone embeddings of the whole pool, cached per checkpoint.

The cache key is the sha256 of `backbone.pt`, so a new checkpoint never reuses stale features and two
commands on the same checkpoint embed once: `RUN/features/<sha16>.npz` with `train` [N, D] and `test` [M, D]
(M = 0 without a labeled test set). It is a cache: an unreadable or mismatched file is recomputed, with a warning.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl.backbones import load_backbone_checkpoint
from alssl.data import Dataset, to_tensor
from alssl.errors import warn
from alssl.runs import atomic_write_bytes


@torch.no_grad()
def embed(model: nn.Module, x, *, mean, std, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Features [N, D] float32 of uint8 images [N, H, W, C] (an array or a DiskPool) through `model` in eval mode."""
    model = model.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_tensor(x[i : i + batch_size], mean, std).to(device)  # [B, C, H, W]
        out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(model, "dim", 0)), np.float32)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def pool_features(run_path: Path, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train [N, D], test [M, D]) embeddings of the run's stage-1 backbone, computed once per checkpoint."""
    ckpt = Path(run_path) / "checkpoints" / "backbone.pt"
    model, _ = load_backbone_checkpoint(ckpt, expect_channels=dataset.channels)
    cache = Path(run_path) / "features" / f"{file_digest(ckpt)}.npz"
    n_test = len(dataset.x_test) if dataset.has_test else 0
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                train, test = f["train"], f["test"]
            if train.ndim == test.ndim == 2 and (len(train), len(test)) == (dataset.n_pool, n_test):
                return train, test
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass
        warn(f"the feature cache {cache} is unreadable or does not match the data; recomputing it")
    torch.manual_seed(0)
    train = embed(model, dataset.x_train, mean=dataset.mean, std=dataset.std)
    test = (embed(model, dataset.x_test, mean=dataset.mean, std=dataset.std) if n_test
            else np.zeros((0, train.shape[1]), np.float32))
    buf = io.BytesIO()
    np.savez(buf, train=train, test=test)
    atomic_write_bytes(cache, buf.getvalue())
    return train, test
