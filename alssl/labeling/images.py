"""Images as people see them while labeling: pool pixels as PNG, an original file downscaled for the page, and the
query's contact sheet. The one place alssl encodes images (decoding for training is `alssl/data/images.py`)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

MAX_SIDE = 512  # image-folder pools: the page shows originals downscaled to at most this many pixels per side


def png(a: np.ndarray, *, min_side: int = 1) -> bytes:
    """Pool pixels [H, W, C] (uint8) as a PNG, nearest-neighbour upscaled by a whole factor until the shorter side is
    at least `min_side`, so tiny images stay legible (Label Studio: 160)."""
    from PIL import Image

    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    k = max(1, math.ceil(min_side / max(1, min(im.size))))
    if k > 1:
        im = im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def downscaled(path: Path, max_side: int = MAX_SIDE) -> tuple[bytes, str]:
    """(bytes, media type) of an original image file as the page shows it: EXIF-oriented, RGB or grayscale, at most
    `max_side` pixels a side; PNG for small images (lossless), else JPEG."""
    import warnings

    from PIL import Image, ImageOps

    from alssl.data.images import _to_mode, image_mode_is_gray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", (max_side, max_side))
            im = ImageOps.exif_transpose(im)
            im = _to_mode(im, 1 if image_mode_is_gray(im.mode) else 3)
            im.thumbnail((max_side, max_side), Image.LANCZOS)
            buf = io.BytesIO()
            if max(im.size) <= 128:  # small files: lossless
                im.save(buf, format="PNG")
                return buf.getvalue(), "image/png"
            im.save(buf, format="JPEG", quality=88)
            return buf.getvalue(), "image/jpeg"


def contact_sheet(images: np.ndarray, indices: np.ndarray, *, cols: int = 10) -> bytes:
    """A PNG grid of the queried images, each captioned with its pool index, for a person to label from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices.tolist()):
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(str(i), fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
