"""Backbones in a dict registry. Each maps images `[B, C, H, W]` to features `[B, module.dim]`.

- `cnn`: a small conv net (≈0.3 M params) that trains fast on CPU; 1 or 3 channels, 8–32 px inputs.
- `resnet18`: torchvision's ResNet-18 with the CIFAR stem (3×3 conv, stride 1, no max-pool), 512-d.
- `wrn28_2`: Wide-ResNet-28-2 (Zagoruyko & Komodakis 2016, arXiv 1605.07146) as used by FixMatch,
  SimMatch and DASO (BN momentum 0.001, leaky ReLU 0.1), 128-d.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from alssl.errors import UserError, unknown
from alssl.runs import torch_load


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Five 3×3 conv-BN-ReLU layers, two 2×2 max-pools, global average pool → 128-d features."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w), *_conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, dim]
        return self.features(x)


class ResNet18Cifar(nn.Module):
    """torchvision ResNet-18 with the CIFAR stem: conv1 3×3 stride 1, no max-pool, fc removed (512-d)."""

    def __init__(self, in_channels: int):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _WideBasic(nn.Module):
    """Pre-activation wide block (BN-LReLU-conv ×2) as in the FixMatch WRN."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act(self.bn1(x))
        if self.shortcut is not None or self.activate_before_residual:
            x = o  # the residual branch starts from the activated input
        out = self.conv2(self.act(self.bn2(self.conv1(o))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-widen (depth = 6n+4); features after the final BN-LReLU and global pooling."""

    def __init__(self, in_channels: int, depth: int = 28, widen: int = 2):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                cin = ch[g] if i == 0 else ch[g + 1]
                blocks.append(_WideBasic(cin, ch[g + 1], stride if i == 0 else 1, activate_before_residual=(g == 0 and i == 0)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch[3], momentum=0.001)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dim = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.blocks(self.conv(x))))).flatten(1)


BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "cnn": SmallCNN,
    "resnet18": ResNet18Cifar,
    "wrn28_2": lambda c: WideResNet(c, depth=28, widen=2),
}


def build_backbone(name: str, in_channels: int) -> nn.Module:
    """A fresh backbone by registry name; `module.dim` is its feature dimension."""
    if name not in BACKBONES:
        raise unknown("backbone", name, BACKBONES)
    return BACKBONES[name](in_channels)


def backbone_checkpoint(model: nn.Module, *, name: str, in_channels: int, **meta: object) -> dict:
    """What `checkpoints/backbone.pt` holds: the registry name, input channels, weights and plain metadata."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": "alssl-backbone", "backbone": name, "in_channels": in_channels, "state_dict": state, "meta": dict(meta)}


def _checkpoint_problem(ckpt: dict) -> str | None:
    """What is wrong with the fields of a backbone checkpoint dict, or None."""
    missing = [k for k in ("backbone", "in_channels", "state_dict") if k not in ckpt]
    if missing:
        return f"key {missing[0]!r} is missing"
    name, ch, sd = ckpt["backbone"], ckpt["in_channels"], ckpt["state_dict"]
    if not isinstance(name, str) or name not in BACKBONES:
        return f"backbone is {name!r}, not one of {', '.join(BACKBONES)}"
    if type(ch) is not int or not 1 <= ch <= 64:
        return f"in_channels is {ch!r}, not a channel count"
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        return "state_dict is not a dict of named tensors"
    if not isinstance(ckpt.get("meta", {}), dict):
        return "meta is not a dict"
    return None


def load_backbone_checkpoint(path: str | Path, *, expect_channels: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a backbone from `backbone.pt` (loaded with weights_only=True); returns (model in eval mode, checkpoint).

    A checkpoint of another kind, another backbone's weights or another channel count is a UserError.
    """
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "alssl-backbone":
        raise UserError(f"{path} is not an alssl backbone checkpoint; rerun `alssl pretrain` to rewrite it")
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); delete it and rerun `alssl pretrain` with the run's arguments")
    if expect_channels is not None and ckpt["in_channels"] != expect_channels:
        raise UserError(
            f"{path} was trained on {ckpt['in_channels']}-channel images but the data has {expect_channels}; "
            "pretrain on the same data"
        )
    model = build_backbone(ckpt["backbone"], ckpt["in_channels"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UserError(
            f"{path} holds weights that do not fit backbone {ckpt['backbone']!r} (another backbone's checkpoint?); "
            "rerun `alssl pretrain`"
        ) from None
    return model.eval(), ckpt
