"""Weak and strong views for semi-supervised training, drawn per sample on batched tensors on the training device.

Images come in as float `[B, C, H, W]` in [0, 1] (C = 1 or 3, 8–32 px) and leave in the same range; the trainer
normalises afterwards. Every random choice is made per sample (one batch holds many different crops, flips, ops and
cutouts): torchvision.transforms.v2 on a batch draws one parameter set for the whole batch, and kornia's
`auto.RandAugment` draws one op sequence per call, so neither is used for the strong view.

- weak (FixMatch, arXiv 2001.07685, §3.2): random horizontal flip (p = 0.5) and a random translation by up to 12.5 %
  of the size, done as FixMatch does it — reflect-pad by round(0.125·size) and take a random crop (kornia).
- strong: FixMatch's RandAugment variant (paper Table 12): each sample gets 2 ops drawn uniformly from the 14 below,
  each with its own random magnitude from the op's range, then Cutout (a gray square of side L·size, L ~ U(0, 0.5]).
  Enhancement factors follow the official code's mapping 0.1 + 1.9·level with level ~ U[0.05, 0.95].
"""

from __future__ import annotations

import kornia.augmentation as K
import kornia.enhance
import torch
from kornia.geometry.transform import warp_affine

GRAY = 0.5  # fill for pixels uncovered by geometric ops and for Cutout (FixMatch fills with gray 128)


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


# ---------------------------------------------------------------- strong view ops
# Each op maps (x [b, C, H, W] in [0, 1], level [b] in the op's range) -> [b, C, H, W]; every sample has its own level.
def _gray(x: torch.Tensor) -> torch.Tensor:  # [b, 1, H, W] luminance (ITU-R 601-2, as PIL's "L")
    if x.shape[1] == 1:
        return x
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _factor(level: torch.Tensor) -> torch.Tensor:  # [b] -> [b, 1, 1, 1], enhancement factor 0.1 + 1.9·level
    return (0.1 + 1.9 * level).view(-1, 1, 1, 1)


def identity(x, level):
    return x


def autocontrast(x, level):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-8), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp(0, 1)


def equalize(x, level):
    return kornia.enhance.equalize(x)


def brightness(x, level):  # blend with black
    return (x * _factor(level)).clamp(0, 1)


def color(x, level):  # blend with the grayscale image (a no-op on 1-channel images)
    g = _gray(x)
    return (g + _factor(level) * (x - g)).clamp(0, 1)


def contrast(x, level):  # blend with the mean gray level
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (m + _factor(level) * (x - m)).clamp(0, 1)


def sharpness(x, level):  # PIL ImageEnhance.Sharpness semantics
    return kornia.enhance.sharpness(x, (0.1 + 1.9 * level).to(x.dtype)).clamp(0, 1)


def posterize(x, level):  # keep `bits` ∈ {4..8} most significant bits
    shift = (8 - level.round()).clamp(0, 4).view(-1, 1, 1, 1)
    q = torch.pow(2.0, shift)
    return torch.floor(torch.round(x * 255) / q) * q / 255


def solarize(x, level):  # invert pixels at or above the threshold
    t = level.view(-1, 1, 1, 1)
    return torch.where(x >= t, 1.0 - x, x)


def _warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Affine warp about the image centre with per-sample 2×3 matrices `m` [b, 2, 3] (in centred pixel coords)."""
    b, _, h, w = x.shape
    c = x.new_tensor([(w - 1) / 2, (h - 1) / 2])
    # M = T(c) · A · T(-c), written out: translation part = c + t - A c
    mat = m.clone()
    mat[:, :, 2] = c + m[:, :, 2] - (m[:, :, :2] @ c)
    return warp_affine(x - GRAY, mat, (h, w), mode="bilinear", padding_mode="zeros", align_corners=True) + GRAY


def _affine(b: int, device, dtype) -> torch.Tensor:
    return torch.eye(2, 3, device=device, dtype=dtype).repeat(b, 1, 1)


def rotate(x, level):  # degrees
    a = torch.deg2rad(level)
    m = _affine(len(x), x.device, x.dtype)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return _warp(x, m)


def shear_x(x, level):
    m = _affine(len(x), x.device, x.dtype)
    m[:, 0, 1] = level
    return _warp(x, m)


def shear_y(x, level):
    m = _affine(len(x), x.device, x.dtype)
    m[:, 1, 0] = level
    return _warp(x, m)


def translate_x(x, level):  # fraction of the width
    m = _affine(len(x), x.device, x.dtype)
    m[:, 0, 2] = level * x.shape[3]
    return _warp(x, m)


def translate_y(x, level):
    m = _affine(len(x), x.device, x.dtype)
    m[:, 1, 2] = level * x.shape[2]
    return _warp(x, m)


# name -> (op, low, high): FixMatch's RandAugment pool (arXiv 2001.07685, Table 12)
RA_OPS = {
    "identity": (identity, 0.0, 0.0),
    "autocontrast": (autocontrast, 0.0, 0.0),
    "equalize": (equalize, 0.0, 0.0),
    "brightness": (brightness, 0.05, 0.95),
    "color": (color, 0.05, 0.95),
    "contrast": (contrast, 0.05, 0.95),
    "sharpness": (sharpness, 0.05, 0.95),
    "posterize": (posterize, 4.0, 8.0),
    "solarize": (solarize, 0.0, 1.0),
    "rotate": (rotate, -30.0, 30.0),
    "shear_x": (shear_x, -0.3, 0.3),
    "shear_y": (shear_y, -0.3, 0.3),
    "translate_x": (translate_x, -0.3, 0.3),
    "translate_y": (translate_y, -0.3, 0.3),
}


def cutout(x: torch.Tensor, max_frac: float = 0.5) -> torch.Tensor:
    """Per sample, fill a square of side L·min(H, W) (L ~ U(0, max_frac]) at a uniform centre with gray."""
    b, _, h, w = x.shape
    side = (torch.rand(b, device=x.device) * max_frac * min(h, w)).clamp_min(1.0)  # [b] pixels
    cy = torch.rand(b, device=x.device) * h
    cx = torch.rand(b, device=x.device) * w
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w) + 0.5
    half = (side / 2).view(b, 1, 1)
    inside = ((ys - cy.view(b, 1, 1)).abs() < half) & ((xs - cx.view(b, 1, 1)).abs() < half)  # [b, H, W]
    return torch.where(inside.unsqueeze(1), torch.full_like(x, GRAY), x)


class StrongView(torch.nn.Module):
    """RandAugment (n ops per sample, random magnitudes) + Cutout, per sample, on a batch."""

    def __init__(self, image_size: int, *, n: int = 2, hflip: bool = True, cutout_frac: float = 0.5):
        super().__init__()
        self.weak = WeakView(image_size, hflip=hflip)  # FixMatch's strong view starts from the weak flip+crop
        self.n = n
        self.cutout_frac = cutout_frac
        self.ops = list(RA_OPS.values())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        x = self.weak(x)
        b = len(x)
        choice = torch.randint(len(self.ops), (self.n, b), device=x.device)  # [n, B] op id per sample and round
        u = torch.rand(self.n, b, device=x.device, dtype=x.dtype)  # [n, B] magnitude position in the op's range
        for r in range(self.n):
            out = x.clone()
            for k, (op, lo, hi) in enumerate(self.ops):
                idx = (choice[r] == k).nonzero().squeeze(1)
                if len(idx) and op is not identity:
                    out[idx] = op(x[idx], lo + (hi - lo) * u[r, idx])
            x = out
        return cutout(x, self.cutout_frac) if self.cutout_frac > 0 else x


def views_for(image_size: int, *, hflip: bool = True) -> tuple[WeakView, StrongView]:
    """The (weak, strong) pair used by every method."""
    return WeakView(image_size, hflip=hflip), StrongView(image_size, hflip=hflip)

