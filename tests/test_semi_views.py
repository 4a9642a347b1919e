"""The strong view is USB's RandAugment(3, 5) + Cutout: op list, count and ranges pinned, and every op checked
pixel for pixel against PIL called the way USB calls it (semilearn/datasets/augmentation/randaugment.py)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch

from alssl.semi import views
from alssl.semi.views import CUTOUT_MAX, N_OPS, RA_OPS, StrongView, cutout, cutout_centres

# USB's augment_list(): (name, low, high), in its order
USB_OPS = [("autocontrast", 0, 1), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95),
           ("equalize", 0, 1), ("identity", 0, 1), ("posterize", 4, 8), ("rotate", -30, 30),
           ("sharpness", 0.05, 0.95), ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0, 256),
           ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3)]

# how USB applies each op to a PIL image with magnitude v
PIL_OPS = {
    "autocontrast": lambda im, v: PIL.ImageOps.autocontrast(im),
    "brightness": lambda im, v: PIL.ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: PIL.ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: PIL.ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: PIL.ImageOps.equalize(im),
    "identity": lambda im, v: im,
    "posterize": lambda im, v: PIL.ImageOps.posterize(im, max(1, int(v))),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: PIL.ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: PIL.ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def test_op_list_count_and_ranges_are_usbs():
    assert [(k, lo, hi) for k, (_, lo, hi) in RA_OPS.items()] == USB_OPS
    assert N_OPS == 3 and StrongView(32).n == 3  # RandAugment(3, 5)
    assert CUTOUT_MAX == 0.5


def _image(rng: np.random.Generator, c: int, s: int) -> np.ndarray:
    """uint8 [s, s, c]: noise, or a gradient with noise (so equalize/autocontrast/sharpness have work to do)."""
    noise = rng.integers(0, 256, (s, s, c))
    yy, xx = np.mgrid[0:s, 0:s]
    grad = ((xx * 5 + yy * 3) % 256)[..., None]
    mixed = 0.6 * grad + 0.4 * noise if rng.random() < 0.5 else noise
    return np.clip(mixed, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(PIL_OPS))
@pytest.mark.parametrize("c,s", [(3, 32), (1, 8)])
def test_every_op_matches_pil_as_usb_calls_it(name, c, s):
    rng = np.random.default_rng(0)
    op, lo, hi = RA_OPS[name]
    diff, total = 0, 0
    for _ in range(30):
        a = _image(rng, c, s)
        v = float(np.float32(lo + (hi - lo) * rng.random()))
        ref = np.asarray(PIL_OPS[name](PIL.Image.fromarray(a[..., 0] if c == 1 else a), v), dtype=np.float32)
        ref = ref[..., None] if ref.ndim == 2 else ref
        out = op(torch.from_numpy(a).permute(2, 0, 1)[None].float(), torch.tensor([v]))[0].permute(1, 2, 0).numpy()
        diff += int((out != ref).sum())
        total += ref.size
    # exact, except that PIL's nearest-neighbour affine runs in 16.16 fixed point: a pixel on a boundary may flip
    assert diff / total <= (1e-3 if name == "rotate" else 0.0), f"{name}: {diff} of {total} values differ"


def test_cutout_matches_pil_rectangle_and_centre_is_drawn_from_1_to_w():
    rng = np.random.default_rng(1)
    w = 32
    for _ in range(200):
        a = rng.integers(0, 256, (w, w, 3)).astype(np.uint8)
        v, cx, cy = rng.random() * 0.5, w + (1 - w) * rng.random(), w + (1 - w) * rng.random()
        side = v * w  # USB's CutoutAbs, with the centre given
        x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
        im = PIL.Image.fromarray(a)
        PIL.ImageDraw.Draw(im).rectangle((x0, y0, min(w, x0 + side), min(w, y0 + side)), (125, 123, 114))
        t = lambda z: torch.tensor([z], dtype=torch.float64)  # noqa: E731
        out = cutout(torch.from_numpy(a).permute(2, 0, 1)[None].float(), t(v), t(cx), t(cy))[0].permute(1, 2, 0)
        assert np.array_equal(out.numpy(), np.asarray(im, dtype=np.float32))
    cx, cy = cutout_centres(10_000, 8, 32, "cpu")
    assert float(cx.min()) > 1.0 and float(cx.max()) <= 32.0 and float(cx.mean()) == pytest.approx(16.5, abs=0.3)
    assert float(cy.min()) > 1.0 and float(cy.max()) <= 8.0  # np.random.uniform(w): U(1, W], not U[0, W)


def test_strong_view_draws_3_ops_per_sample_with_replacement_and_magnitudes_in_range(monkeypatch):
    calls: list[tuple[str, np.ndarray]] = []

    def recorder(name):
        def op(u, v):
            calls.append((name, v.double().numpy()))
            return u
        return op

    sv = StrongView(8, hflip=False)
    sv.ops = [(recorder(k), lo, hi) for k, (_, lo, hi) in RA_OPS.items()]
    monkeypatch.setattr(views, "cutout", lambda u, v, cx, cy: u)
    torch.manual_seed(0)
    sv(torch.rand(700, 1, 8, 8))
    counts = {k: sum(len(v) for n, v in calls if n == k) for k in RA_OPS}
    assert sum(counts.values()) == 3 * 700  # every sample gets exactly 3 ops (identity included)
    assert all(100 <= n <= 200 for n in counts.values()), counts  # uniform choice: 150 each expected
    for name, v in calls:
        _, lo, hi = RA_OPS[name]
        assert (v >= lo).all() and (v <= hi).all(), name
    assert len({tuple(v) for n, v in calls if n == "rotate"}) > 1  # per-sample magnitudes


def test_strong_view_stays_on_the_8_bit_grid_and_in_range():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32)).float() / 255
    y = StrongView(32)(x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.allclose(y * 255, torch.round(y * 255), atol=1e-4)


def test_equalize_takes_non_contiguous_tensors():
    """A channels-last view (or any non-contiguous tensor) gives what its contiguous copy gives."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(np.stack([_image(rng, 3, 16) for _ in range(4)])).float()  # [4, 16, 16, 3]
    u = a.permute(0, 3, 1, 2)  # [4, 3, 16, 16], not contiguous
    assert not u.is_contiguous()
    ref = RA_OPS["equalize"][0](u.contiguous(), torch.zeros(4))
    assert torch.equal(RA_OPS["equalize"][0](u, torch.zeros(4)), ref)
    strided = u[:, :, ::2, ::2]
    assert torch.equal(RA_OPS["equalize"][0](strided, torch.zeros(4)),
                       RA_OPS["equalize"][0](strided.contiguous(), torch.zeros(4)))
