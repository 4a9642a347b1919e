"""Weak and strong views for semi-supervised training, drawn per sample on batched tensors on the training device.

Images come in as float `[B, C, H, W]` in [0, 1] (C = 1 or 3, 8–32 px) and leave in the same range; the trainer
normalises afterwards. Every random choice is made per sample (one batch holds many different crops, flips, ops and
cutouts): torchvision.transforms.v2 on a batch draws one parameter set for the whole batch, and kornia's
`auto.RandAugment` draws one op sequence per call, so neither is used for the strong view.

- weak (FixMatch, arXiv 2001.07685, §3.2): random horizontal flip (p = 0.5) and a random translation by up to 12.5 %
  of the size, done as FixMatch does it — reflect-pad by round(0.125·size) and take a random crop (kornia).
- strong: weak, then USB's `RandAugment(3, 5)` + Cutout exactly (semilearn/datasets/augmentation/randaugment.py,
  the strong view of USB's FixMatch / SimMatch / DASO CIFAR configs): per sample, 3 ops drawn uniformly WITH
  replacement from the 14 of `RA_OPS`, each always applied with its own magnitude v ~ U[low, high) (the `m` = 5 of
  RandAugment(3, 5) is unused by USB), then Cutout with side v·W, v ~ U[0, 0.5). The ops follow PIL's semantics on
  8-bit images (what USB runs): enhancement factors ARE v (0.05–0.95, so Brightness always darkens), truncating
  blends, nearest-neighbour affine warps about PIL's origin with black fill, Cutout in gray (125, 123, 114) with
  its centre drawn from U(1, W] (USB's `np.random.uniform(w)` passes W as numpy's `low`). Images
  are kept on the 8-bit grid between ops (values k/255), so every op sees the integers PIL would.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- weak view
class WeakView(torch.nn.Module):
    """Flip + pad-and-crop translate, per sample (kornia.augmentation)."""

    def __init__(self, image_size: int, *, hflip: bool = True, translate: float = 0.125):
        super().__init__()
        pad = max(1, round(translate * image_size))
        ops: list[torch.nn.Module] = [K.RandomHorizontalFlip(p=0.5)] if hflip else []
        ops.append(K.RandomCrop((image_size, image_size), padding=pad, padding_mode="reflect"))
        self.aug = K.AugmentationSequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        return self.aug(x)


# ---------------------------------------------------------------- strong view ops (PIL semantics, as USB)
# Each op maps (u [b, C, H, W] with integer values 0..255 as float, v [b] in the op's range) -> u', on the same grid.
# [b, 1, H, W] PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16
def _luma(u: torch.Tensor) -> torch.Tensor:
    if u.shape[1] == 1:
        return u
    w = u.new_tensor([19595.0, 38470.0, 7471.0]).view(1, 3, 1, 1)
    return torch.floor(((u * w).sum(1, keepdim=True) + 32768.0) / 65536.0)


def _blend(degenerate: torch.Tensor, u: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, u, factor): truncated to an integer, clipped to [0, 255]."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (u - degenerate)
    return torch.trunc(out).clamp(0, 255)


def identity(u, v):
    return u


def autocontrast(u, v):  # PIL ImageOps.autocontrast: per channel, [lo, hi] -> [0, 255], truncated
    d = u.double()  # PIL builds the lookup table in Python floats
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)  # tensor / tensor: IEEE division, as Python
    out = torch.trunc(d * scale - lo * scale).clamp(0, 255).to(u.dtype)
    return torch.where(hi > lo, out, u)


def equalize(u, v):  # PIL ImageOps.equalize, per channel
    b, c, h, w = u.shape
    flat = u.reshape(b * c, h * w).long()  # [bc, HW]
    ones = torch.ones(flat.shape, device=u.device, dtype=u.dtype)  # from flat's shape: u may be non-contiguous
    hist = torch.zeros(b * c, 256, device=u.device, dtype=u.dtype).scatter_add_(1, flat, ones)
    top = hist.gather(1, flat.amax(1, keepdim=True))  # [bc, 1] count of the highest occupied level
    step = torch.floor((hist.sum(1, keepdim=True) - top) / 255.0)  # [bc, 1]
    before = torch.cumsum(hist, 1) - hist  # [bc, 256] pixels below each level
    lut = torch.floor((torch.floor(step / 2) + before) / step.clamp_min(1.0)).clamp(max=255)
    out = lut.gather(1, flat).view(b, c, h, w)
    keep = (step > 0).view(b, c, 1, 1)  # one occupied level, or too few pixels: unchanged
    return torch.where(keep, out, u)


def brightness(u, v):  # blend with black
    return _blend(torch.zeros_like(u), u, v)


def color(u, v):  # blend with the grayscale image (a no-op on 1-channel images)
    return _blend(_luma(u).expand_as(u), u, v)


def contrast(u, v):  # blend with the rounded mean gray level
    mean = torch.floor(_luma(u).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(u), u, v)


def sharpness(u, v):  # blend with ImageFilter.SMOOTH (3×3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, rounded; border kept)
    c = u.shape[1]
    k = u.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]).div_(13.0).expand(c, 1, 3, 3)
    smooth = torch.floor(F.conv2d(u, k, groups=c) + 0.5).clamp(0, 255)  # [b, C, H-2, W-2]
    degenerate = u.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, u, v)


def posterize(u, v):  # keep int(v) ∈ {4..7} most significant bits
    q = torch.pow(2.0, 8.0 - torch.floor(v).clamp(1, 8)).view(-1, 1, 1, 1)
    return torch.floor(u / q) * q


def solarize(u, v):  # invert every pixel >= v (v ∈ [0, 256))
    return torch.where(u >= v.view(-1, 1, 1, 1), 255.0 - u, u)


def _affine(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, m, NEAREST): output pixel (x, y) takes input pixel ⌊m·(x + ½, y + ½, 1)⌋, black
    where that falls outside. m [b, 2, 3] maps output to input coordinates (origin at the top-left corner)."""
    b, c, h, w = u.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=u.device, dtype=u.dtype) + 0.5,
                            torch.arange(w, device=u.device, dtype=u.dtype) + 0.5, indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones_like(xs).reshape(-1)])  # [3, HW]
    src = torch.floor(m.to(u.dtype) @ pts)  # [b, 2, HW]
    sx, sy = src[:, 0].long(), src[:, 1].long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)  # [b, HW]
    idx = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).unsqueeze(1).expand(b, c, h * w)
    out = u.reshape(b, c, h * w).gather(2, idx)
    return torch.where(inside.unsqueeze(1), out, torch.zeros_like(out)).view(b, c, h, w)


def _eye(v: torch.Tensor) -> torch.Tensor:  # [b, 2, 3] identity affine maps
    return torch.eye(2, 3, dtype=torch.float64, device=v.device).repeat(len(v), 1, 1)


def rotate(u, v):  # PIL Image.rotate(v): counter-clockwise by v degrees about (W/2, H/2)
    h, w = u.shape[2:]
    a = -torch.deg2rad(v.double())
    cos, sin = torch.cos(a), torch.sin(a)
    m = _eye(v)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
    cx, cy = w / 2.0, h / 2.0
    m[:, 0, 2] = cx - (cos * cx + sin * cy)
    m[:, 1, 2] = cy - (-sin * cx + cos * cy)
    return _affine(u, m)


def shear_x(u, v):  # (1, v, 0, 0, 1, 0)
    m = _eye(v)
    m[:, 0, 1] = v.double()
    return _affine(u, m)


def shear_y(u, v):  # (1, 0, 0, v, 1, 0)
    m = _eye(v)
    m[:, 1, 0] = v.double()
    return _affine(u, m)


def translate_x(u, v):  # (1, 0, v·W, 0, 1, 0): v is a fraction of the width
    m = _eye(v)
    m[:, 0, 2] = v.double() * u.shape[3]
    return _affine(u, m)


def translate_y(u, v):  # (1, 0, 0, 0, 1, v·H)
    m = _eye(v)
    m[:, 1, 2] = v.double() * u.shape[2]
    return _affine(u, m)


# name -> (op, low, high): USB's augment_list(), same order and ranges (semilearn/datasets/augmentation/randaugment.py)
RA_OPS = {
    "autocontrast": (autocontrast, 0.0, 1.0),
    "brightness": (brightness, 0.05, 0.95),
    "color": (color, 0.05, 0.95),
    "contrast": (contrast, 0.05, 0.95),
    "equalize": (equalize, 0.0, 1.0),
    "identity": (identity, 0.0, 1.0),
    "posterize": (posterize, 4.0, 8.0),
    "rotate": (rotate, -30.0, 30.0),
    "sharpness": (sharpness, 0.05, 0.95),
    "shear_x": (shear_x, -0.3, 0.3),
    "shear_y": (shear_y, -0.3, 0.3),
    "solarize": (solarize, 0.0, 256.0),
    "translate_x": (translate_x, -0.3, 0.3),
    "translate_y": (translate_y, -0.3, 0.3),
}
N_OPS = 3  # RandAugment(3, 5)
CUTOUT_MAX = 0.5  # Cutout side v·W with v ~ U[0, 0.5)
CUTOUT_RGB = (125.0, 123.0, 114.0)  # USB's fill; 1-channel images get its luma, 123


def cutout(u: torch.Tensor, v: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """USB's Cutout(img, v) per sample with side s = v·W and drawn centre (cx, cy) [b]: the box starts at
    int(max(0, cx − s/2)) and PIL fills columns x_start..int(min(W, x_start + s)) INCLUSIVE (rows likewise)."""
    b, c, h, w = u.shape
    side = v * w  # [b]
    x0 = torch.floor((cx - side / 2).clamp_min(0))
    y0 = torch.floor((cy - side / 2).clamp_min(0))
    x1 = torch.floor(torch.clamp(x0 + side, max=w))
    y1 = torch.floor(torch.clamp(y0 + side, max=h))
    xs = torch.arange(w, device=u.device, dtype=x0.dtype).view(1, 1, w)
    ys = torch.arange(h, device=u.device, dtype=y0.dtype).view(1, h, 1)
    inside = (xs >= x0.view(b, 1, 1)) & (xs <= x1.view(b, 1, 1)) & (ys >= y0.view(b, 1, 1)) & (ys <= y1.view(b, 1, 1))
    inside &= (v > 0).view(b, 1, 1)  # v = 0 leaves the image alone
    fill = u.new_tensor(CUTOUT_RGB if c == 3 else (123.0,) * c).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), fill.expand_as(u), u)


def cutout_centres(b: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """USB draws the centre with `np.random.uniform(w)`, whose first argument is numpy's `low`: U(1, W], not U[0, W)."""
    u = torch.rand(2, b, device=device, dtype=torch.float64)
    return w + (1.0 - w) * u[0], h + (1.0 - h) * u[1]


class StrongView(torch.nn.Module):
    """Weak view, then USB's RandAugment(3, 5) + Cutout, every random choice per sample, on a batch."""

    def __init__(self, image_size: int, *, hflip: bool = True, n_ops: int = N_OPS):
        super().__init__()
        self.weak = WeakView(image_size, hflip=hflip)  # USB's strong transform starts with the same flip + crop
        self.n = n_ops
        self.ops = list(RA_OPS.values())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] in [0, 1] -> same
        u = torch.round(self.weak(x).float() * 255.0)  # the 8-bit image PIL would hold
        b = len(u)
        choice = torch.randint(len(self.ops), (self.n, b), device=u.device)  # [n, B] random.choices, with replacement
        frac = torch.rand(self.n, b, device=u.device, dtype=torch.float64)  # [n, B] position in each op's range
        for r in range(self.n):
            out = u.clone()
            for k, (op, lo, hi) in enumerate(self.ops):
                idx = (choice[r] == k).nonzero().squeeze(1)
                if len(idx) and op is not identity:
                    out[idx] = op(u[idx], (lo + (hi - lo) * frac[r, idx]).to(u.dtype))
            u = out
        v = torch.rand(b, device=u.device, dtype=torch.float64) * CUTOUT_MAX  # [B] cutout_val = random() * 0.5
        cx, cy = cutout_centres(b, u.shape[2], u.shape[3], u.device)
        return (cutout(u, v, cx, cy) / 255.0).to(x.dtype)


def views_for(image_size: int, *, hflip: bool = True) -> tuple[WeakView, StrongView]:
    """The (weak, strong) pair used by every method."""
    return WeakView(image_size, hflip=hflip), StrongView(image_size, hflip=hflip)
