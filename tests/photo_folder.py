"""Build a realistic folder of "your own photos" from CIFAR-10 images: mixed sizes, formats, modes, nesting, names
that need CSV quoting, a few corrupt files; plus a labeled test folder. Used by the tests and bench/ingest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_10k.npz"
SIZES = [(24, 24), (32, 32), (48, 40), (64, 64), (100, 75), (150, 200), (200, 150)]
FOLDERS = ["", "trip", "trip/day 2", "phone/DCIM"]


def _variant(a: np.ndarray, i: int, sizes: list[tuple[int, int]]) -> tuple[Image.Image, str]:
    """Image i as (PIL image, file extension): size, mode and format rotate with i."""
    im = Image.fromarray(a).resize(sizes[(i // 7) % len(sizes)], Image.BICUBIC)  # every size in every format
    kind = i % 7
    if kind == 0:
        return im.convert("L"), ".png"
    if kind == 1:
        return im, ".JPG" if i % 2 else ".jpg"
    if kind == 2:
        rgba = im.convert("RGBA")
        rgba.putalpha(200)
        return rgba, ".png"
    if kind == 3:
        return im.convert("P", palette=Image.ADAPTIVE, colors=64), ".png"
    if kind == 4:
        return im, ".webp"
    if kind == 5:
        return im.convert("L"), ".jpeg"
    return im, ".png"


def make_photo_folder(root: Path, n: int, *, start: int = 0, sizes: list[tuple[int, int]] | None = None,
                      corrupt: int = 3, quality: int = 90) -> dict[str, str]:
    """`n` CIFAR training images (from `start`) under root, plus `corrupt` broken files and a non-image file.

    Returns {relative path: class name} of the good images."""
    with np.load(CIFAR) as f:
        x, y, classes = f["x_train"][start : start + n], f["y_train"][start : start + n], list(f["classes"])
    truth = {}
    for i, (a, label) in enumerate(zip(x, y)):
        im, ext = _variant(a, i, sizes or SIZES)
        name = f"img, {i:05d}{ext}" if i % 97 == 5 else f"img_{i:05d}{ext}"  # a few names need CSV quoting
        rel = "/".join(p for p in (FOLDERS[i % len(FOLDERS)], name) if p)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel, quality=quality) if ext.lower() in (".jpg", ".jpeg", ".webp") else im.save(root / rel)
        truth[rel] = str(classes[int(label)])
    bad = [("broken/empty.jpg", b""), ("broken/truncated.png", None), ("broken/noise.png", bytes(range(256)) * 4),
           ("broken/not_really.webp", b"RIFF0000WEBPVP8 garbage"), ("broken/half.jpg", None)]
    for rel, data in bad[:corrupt]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if data is None:  # the first half of a real file
            src = next(p for p in sorted(root.rglob("*.png" if rel.endswith(".png") else "*.jpg"))
                       if "broken" not in str(p))
            data = src.read_bytes()[: src.stat().st_size // 2]
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("not an image\n")
    return truth


def make_test_folder(root: Path, n: int, *, start: int = 0) -> None:
    """A labeled test folder root/<class>/NNNN.png from CIFAR test images (mixed sizes too)."""
    with np.load(CIFAR) as f:
        x, y, classes = f["x_test"][start : start + n], f["y_test"][start : start + n], list(f["classes"])
    for i, (a, label) in enumerate(zip(x, y)):
        d = root / str(classes[int(label)])
        d.mkdir(parents=True, exist_ok=True)
        im, ext = _variant(a, i, SIZES)
        im.save(d / f"{i:04d}{ext}")
