"""Backbones. Each maps images `[B, C, H, W]` to features `[B, module.dim]`.

Built in (a dict registry), sized for small images:
- `cnn`: a small conv net (≈0.3 M params) that trains fast on CPU; 1 or 3 channels, 8–64 px inputs.
- `resnet18`: torchvision's ResNet-18 with the CIFAR stem (3×3 conv, stride 1, no max-pool), 512-d.
- `wrn28_2`: Wide-ResNet-28-2 (Zagoruyko & Komodakis 2016, arXiv 1605.07146) as used by FixMatch,
  SimMatch and DASO (BN momentum 0.001, leaky ReLU 0.1), 128-d.
From the ecosystem, by name:
- `torchvision:NAME` (resnet18/34/50, convnext_tiny, efficientnet_b0, ... any classification model of
  `torchvision.models`): the model with its last `nn.Linear` (the classifier) replaced by `Identity`, so the features
  are what the classifier reads (`dim` = that layer's in_features); its state dict keeps torchvision's key names, so
  `alssl export` can hand back a plain `torchvision.models.NAME(num_classes=K)` state dict.
- `timm:NAME` (any timm model): `timm.create_model(NAME, num_classes=0, in_chans=C)`, `dim` = `num_features`.
One-channel pools go into torchvision models as the gray channel repeated three times; timm models get `in_chans=1`.
Starting weights (`--init PATH | hub`) are loaded by `load_init_weights`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from alssl.errors import UserError, suggest, unknown
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
                blocks.append(_WideBasic(cin, ch[g + 1], stride if i == 0 else 1,
                                         activate_before_residual=(g == 0 and i == 0)))
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
PREFIXES = ("torchvision:", "timm:")
NAMES = "cnn | resnet18 (CIFAR stem) | wrn28_2 | torchvision:NAME (e.g. torchvision:resnet18) | timm:NAME"


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model without its classifier: features [B, dim] before the last Linear."""

    def __init__(self, arch: str, in_channels: int):
        super().__init__()
        net = torchvision.models.get_model(arch, weights=None)
        linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        self.head_name, head = linears[-1]  # e.g. "fc", "classifier.2", "heads.head"
        net.set_submodule(self.head_name, nn.Identity())
        self.net, self.arch, self.dim, self.in_channels = net, arch, head.in_features, in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)  # gray -> the 3 channels torchvision models take
        return self.net(x)


class TimmBackbone(nn.Module):
    """A timm model with `num_classes=0`: pooled features [B, num_features]."""

    def __init__(self, arch: str, in_channels: int):
        super().__init__()
        import timm

        try:  # ViTs: any image size (patch-size multiples; e.g. 98/112/224 for ViT-S/14), position embeddings resampled
            self.net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels,
                                         dynamic_img_size=True)
        except TypeError:  # models without that option take any size anyway (CNNs)
            self.net = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels)
        self.arch, self.dim, self.in_channels = arch, int(self.net.num_features), in_channels
        self.head_name = self.net.pretrained_cfg.get("classifier") or "head"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def check_backbone_name(name: str) -> None:
    """Refuse an unknown backbone name with a suggestion (before anything is built or written)."""
    if name.startswith("torchvision:"):
        arch, known = name[len("torchvision:"):], torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise unknown("torchvision classification model", arch, known)
    elif name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if not timm.is_model(arch):
            hint = suggest(arch, timm.list_models(f"*{arch[:4]}*") or timm.list_models())
            raise UserError(f'unknown timm model "{arch}"{hint}; '
                            'see `python -c "import timm; print(timm.list_models())"`')
    elif name not in BACKBONES:
        raise UserError(f'unknown backbone "{name}"{suggest(name, BACKBONES)}; choose one of: {NAMES}')


def build_backbone(name: str, in_channels: int) -> nn.Module:
    """A fresh (randomly initialised) backbone by name; `module.dim` is its feature dimension."""
    check_backbone_name(name)
    if name.startswith("torchvision:"):
        return TorchvisionBackbone(name[len("torchvision:"):], in_channels)
    if name.startswith("timm:"):
        return TimmBackbone(name[len("timm:"):], in_channels)
    return BACKBONES[name](in_channels)


def check_input_size(model: nn.Module, name: str, channels: int, size: int) -> None:
    """One forward of zeros at the pool's image size: a model that cannot take it is refused up front."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure here means this model cannot take these images
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"backbone {name} cannot take {size}×{size} images ({msg}); pick another --image-size or "
                        f"backbone") from None
    finally:
        model.train(was)


# ---------------------------------------------------------------- starting weights (--init)
def _read_state_dict(path: Path) -> dict:
    """A state dict from .pt/.pth (weights_only) or .safetensors; unwraps {"state_dict"|"model": ...} and
    alssl's own backbone.pt, and strips a DDP "module." prefix."""
    if not path.is_file():
        raise UserError(f"--init {path} does not exist; give a state dict file (.pt, .pth or .safetensors) or `hub`")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--init {path} is not a readable .safetensors file ({type(exc).__name__}); "
                            "re-save it") from None
    else:
        sd = torch_load(path)
    if isinstance(sd, dict) and sd.get("kind") == "alssl-backbone":
        sd = sd["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--init {path} does not hold a state dict (a mapping of names to tensors); save one with "
                        f"torch.save(model.state_dict(), PATH)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _download_host(name: str) -> str:
    """The host `--init hub` would download `name`'s weights from (torchvision's URL; Hugging Face's endpoint)."""
    from urllib.parse import urlparse

    if name.startswith("torchvision:"):
        return urlparse(torchvision.models.get_model_weights(name[len("torchvision:"):]).DEFAULT.url).hostname or ""
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` seconds (name lookup included: it runs on a
    thread that is abandoned when late). Without it an offline download takes ~50 s of library retries to fail."""
    import socket
    import threading

    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _offline() -> bool:
    """True when the user said there is no network (Hugging Face's own HF_HUB_OFFLINE, or ALSSL_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ALSSL_OFFLINE"))


def hub_weights_location(name: str) -> tuple[Path | None, str]:
    """Where `--init hub` finds `name`'s published weights on this machine: (the cached file or None, where it goes).

    torchvision: `$TORCH_HOME/hub/checkpoints/<file of the weights URL>` (torch.hub's cache). timm: the Hugging Face
    cache (`$HF_HUB_CACHE`, default ~/.cache/huggingface/hub), repo `<hf_hub_id>`, file model.safetensors (or
    pytorch_model.bin), the layout `huggingface-cli download <hf_hub_id>` fills."""
    if name.startswith("torchvision:"):
        arch = name[len("torchvision:"):]
        try:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError):
            raise UserError(f"torchvision publishes no weights for {arch}; give --init PATH or drop --init") from None
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        return (target if target.is_file() else None), str(target)
    if name.startswith("timm:"):
        import timm
        from huggingface_hub import try_to_load_from_cache

        # read the cache location now (huggingface_hub.constants froze it at import)
        hf_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
        arch = name[len("timm:"):]
        cfg = timm.models.get_pretrained_cfg(arch)
        hub_id = cfg.hf_hub_id if cfg else None
        if not hub_id:
            raise UserError(f"timm publishes no Hugging Face weights for {arch}; give --init PATH or drop --init")
        for fname in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, fname, cache_dir=hf_cache)
            if isinstance(found, str):
                return Path(found), found
        where = f"{hf_cache}/models--{hub_id.replace('/', '--')}/snapshots/<revision>/model.safetensors"
        return None, (f"{where} (run `huggingface-cli download {hub_id}` on a machine with internet and copy its "
                      f"cache to {hf_cache})")
    raise UserError(f"--init hub needs a torchvision:NAME or timm:NAME backbone; {name} has no published weights")


def _hub_state_dict(name: str, in_channels: int = 3) -> dict:
    """The model's published weights: from the local torch.hub / Hugging Face cache when they are there (no network),
    else through torchvision's / timm's own download; offline (HF_HUB_OFFLINE=1) a missing file fails at once."""
    cached, where = hub_weights_location(name)
    if cached is None and _offline():
        raise UserError(f"--init hub: {name}'s weights are not in the local cache and HF_HUB_OFFLINE/ALSSL_OFFLINE "
                        f"says there is no network; put the file at {where}, or pass --init PATH")
    if cached is None and not _reachable(_download_host(name)):  # offline without saying so: one line in seconds
        raise UserError(f"--init hub: {name}'s weights are not in the local cache and {_download_host(name)} cannot "
                        f"be reached (offline?); put the file at {where}, or pass --init PATH")
    if name.startswith("torchvision:"):
        weights = torchvision.models.get_model_weights(name[len("torchvision:"):]).DEFAULT
        try:
            return weights.get_state_dict(progress=False)  # torch.hub reads the cached file when it is there
        except Exception as exc:  # noqa: BLE001 - offline, proxy, disk, a damaged file: the user needs the same facts
            raise UserError(f"cannot {'read' if cached else 'download'} {name}'s weights ({type(exc).__name__}); "
                            f"put {weights.url} at {where} (or pass --init PATH)") from None
    import timm

    arch = name[len("timm:"):]
    overlay = {"file": str(cached)} if cached is not None else None
    try:
        with _quiet_logs():
            return timm.create_model(arch, pretrained=True, num_classes=0, in_chans=in_channels,
                                     pretrained_cfg_overlay=overlay).state_dict()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot {'read' if cached else 'download'} timm's weights for {arch} "
                        f"({type(exc).__name__}); the file belongs at {where}, or pass --init PATH") from None


@contextlib.contextmanager
def _quiet_logs():
    """timm / huggingface_hub log their download retries at WARNING: the user gets alssl's one error line instead."""
    loggers = [logging.getLogger(n) for n in ("timm", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def load_init_weights(model: nn.Module, name: str, init: str) -> dict:
    """Load starting weights into a fresh backbone (`init` = a file path or "hub"); returns what was loaded.

    The source's classifier (torchvision's last Linear, timm's classifier) is dropped: alssl trains its own head.
    Any other key that is missing, unexpected or of another shape is a UserError listing them."""
    sd = (_hub_state_dict(name, getattr(model, "in_channels", 3)) if init == "hub"
          else _read_state_dict(Path(init).expanduser()))
    target = model.net if isinstance(model, (TorchvisionBackbone, TimmBackbone)) else model
    head = getattr(model, "head_name", None)
    if head is not None:
        sd = {k: v for k, v in sd.items() if not (k == head or k.startswith(head + "."))}
    own = target.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape ({k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                         f"{', ...' if len(shapes) > 1 else ''})")
        raise UserError(f"--init {init} does not fit backbone {name}: {'; '.join(parts)}; give weights of the same "
                        f"architecture (and channel count)")
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"--init {init} holds NaN or infinite weights ({bad}); give weights of a model that trained "
                        f"without diverging")
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return {"init": str(init), "init_tensors": len(sd)}


def backbone_checkpoint(model: nn.Module, *, name: str, in_channels: int, **meta: object) -> dict:
    """What `checkpoints/backbone.pt` holds: the registry name, input channels, weights and plain metadata."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": "alssl-backbone", "backbone": name, "in_channels": in_channels, "state_dict": state,
            "meta": dict(meta)}


def _checkpoint_problem(ckpt: dict) -> str | None:
    """What is wrong with the fields of a backbone checkpoint dict, or None."""
    missing = [k for k in ("backbone", "in_channels", "state_dict") if k not in ckpt]
    if missing:
        return f"key {missing[0]!r} is missing"
    name, ch, sd = ckpt["backbone"], ckpt["in_channels"], ckpt["state_dict"]
    if not isinstance(name, str) or not (name in BACKBONES or name.startswith(PREFIXES)):
        return f"backbone is {name!r}, not one of {NAMES}"
    if type(ch) is not int or not 1 <= ch <= 64:
        return f"in_channels is {ch!r}, not a channel count"
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
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
