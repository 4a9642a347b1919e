"""Decode one image file to a small square uint8 array: the preprocessing every folder image gets.

The same function serves the on-disk pool, the labeled test folder and `alssl predict`, so training and
prediction see identical pixels. Steps (documented in docs/data.md and written into model.json):

1. open with Pillow (first frame of a GIF / animated WebP); JPEGs are decoded at reduced scale with
   `Image.draft` (libjpeg's DCT scaling: 1/2, 1/4 or 1/8 of the size, never below the target size), the cheap way
   to read big photos into small training images (a pool built with `--no-jpeg-draft` decodes at full size, so its
   pixels are exactly torchvision's `Resize(S)` + `CenterCrop(S)` on a plain PIL decode);
2. apply the EXIF orientation (`ImageOps.exif_transpose`);
3. convert the mode: 1/L/LA/I/I;16/F → grayscale (16-bit and float pixels scaled to 0..255), everything else
   (P, PA, RGBA, CMYK, YCbCr, LAB, HSV, ...) → RGB as `Image.convert("RGB")` does (alpha dropped, as
   torchvision's ImageFolder loader does); a 1-channel pool keeps grayscale, a 3-channel pool repeats it;
4. resize the shorter side to S (bilinear, antialiased; the longer side becomes int(S·long/short), as
   torchvision's `Resize(S)`), then centre-crop S×S (torchvision's `CenterCrop(S)` offsets).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def is_image_file(path: Path) -> bool:
    """An image by extension (case-insensitive) and not a hidden file (`.name`, e.g. macOS `._x.jpg`)."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `size`, as torchvision's Resize(size) computes it."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def center_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """The centre crop box (left, top, right, bottom) with torchvision's CenterCrop rounding."""
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return left, top, left + size, top + size


def _to_mode(im, channels: int):
    """Convert a PIL image to "L" (channels=1) or "RGB" (channels=3); 16-bit / float gray scaled to 0..255."""
    from PIL import Image

    if im.mode in GRAY_MODES and im.mode not in ("1", "L", "LA"):
        a = np.asarray(im, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "LA":
        im = im.convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL's own advice for palette images with transparency
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def image_mode_is_gray(mode: str) -> bool:
    return mode in GRAY_MODES


def load_image(path: str | Path, size: int, channels: int, draft: bool = True) -> np.ndarray:
    """uint8 [size, size, channels] pixels of one image file (see the module doc for the exact steps).

    Raises whatever Pillow raises on a bad file (OSError, ValueError, SyntaxError, DecompressionBombError, ...);
    callers turn that into a skip or a UserError."""
    return decode_image(path, size, channels, draft)[0]


def decode_image(path: str | Path | io.BytesIO, size: int, channels: int,
                 draft: bool = True) -> tuple[np.ndarray, bool]:
    """(uint8 [size, size, channels] pixels, whether the file is grayscale) of one image file; `draft=False`
    decodes JPEGs at full size (step 1 off)."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency, EXIF and decompression-bomb warnings
        with Image.open(path) as im:
            w, h = im.size
            gray = image_mode_is_gray(im.mode)
            if w < 1 or h < 1:
                raise ValueError(f"image has size {w}×{h}")
            if draft and im.format == "JPEG" and min(w, h) >= 2 * size:
                s = min(w, h)
                im.draft("L" if im.mode == "L" else "RGB", (math.ceil(w * size / s), math.ceil(h * size / s)))
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation (exif_transpose copies even when there is none)
                im = ImageOps.exif_transpose(im)
            im = _to_mode(im, channels)  # loads the pixels (JPEG: at draft scale)
            w, h = im.size
            nw, nh = resized_size(w, h, size)
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            im = im.crop(center_box(nw, nh, size))
            a = np.asarray(im, dtype=np.uint8)
    return (a[..., None] if a.ndim == 2 else a), gray


# ---------------------------------------------------------------- worker tasks
# (spawned processes import only numpy + PIL)
def peek_chunk(args: tuple[str, list[str]]) -> list[tuple[int, int, str] | str]:
    """Header of each file: (width, height, mode), or the reason it cannot be read."""
    from PIL import Image

    root, rels = args
    out: list[tuple[int, int, str] | str] = []
    for rel in rels:
        try:
            if os.path.getsize(os.path.join(root, rel)) == 0:
                out.append("empty file (0 bytes)")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(os.path.join(root, rel)) as im:
                    out.append((int(im.size[0]), int(im.size[1]), str(im.mode)))
        except Exception as exc:  # noqa: BLE001 - any failure to read a header means a bad file
            out.append(_reason(exc))
    return out


def decode_chunk(args: tuple[str, list[str], list[int], int, int, str, int, bool, int | None]
                 ) -> tuple[list[tuple[int, str]], np.ndarray, list[bool], list[str], list[int]]:
    """Decode files into rows `positions` of the staging file (`draft`: JPEG draft decoding, see decode_image), or,
    with a JPEG `quality`, encode each decoded image as a JPEG appended to the chunk file `dest` (`encode_jpeg`).

    Returns (failures (position, reason), per-channel histograms [C, 256] of the decoded pixels, grayscale flag of
    each file, SHA-256 of each file's bytes ("" for a failure), JPEG bytes written for each file (0 for a failure;
    [] for raw rows)). Each file is read once: the bytes hashed are the bytes decoded."""
    root, rels, positions, size, channels, dest, offset, draft, quality = args
    row = size * size * channels
    hist = np.zeros((channels, 256), np.int64)
    failed, grays, hashes, sizes = [], [], [], []
    fd = os.open(dest, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if quality is not None else 0))
    try:
        for rel, pos in zip(rels, positions):
            path = os.path.join(root, rel)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                if not data:
                    raise ValueError("empty file (0 bytes)")
                a, gray = decode_image(io.BytesIO(data), size, channels, draft)
            except Exception as exc:  # noqa: BLE001
                failed.append((pos, _reason(exc)))
                grays.append(True)  # (not counted: the file is skipped)
                hashes.append("")
                sizes.append(0)
                continue
            grays.append(gray)
            hashes.append(hashlib.sha256(data).hexdigest())
            if quality is None:
                os.pwrite(fd, np.ascontiguousarray(a).tobytes(), offset + pos * row)
            else:
                blob = encode_jpeg(a[..., :1] if gray else a, quality)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                sizes.append(len(blob))
            for c in range(channels):
                hist[c] += np.bincount(a[..., c].reshape(-1), minlength=256)
    finally:
        os.close(fd)
    return failed, hist, grays, hashes, sizes


def encode_jpeg(a: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of uint8 [S, S, 1] (stored grayscale) or [S, S, 3] pixels (Pillow's libjpeg, 4:2:0 chroma).

    A grayscale file in a 3-channel pool is stored as a 1-channel JPEG ([S, S, 1]: its three channels are equal) and
    repeated to RGB when read back, as `Image.convert("RGB")` does on decoding."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ValueError) and str(exc) == "empty file (0 bytes)":
        return str(exc)
    msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
