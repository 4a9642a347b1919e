"""Stage-1 methods as objects: `METHODS = {"simsiam": SimSiam, "moco": MoCoV2, "byol": BYOL}`.

A method builds the student (backbone + lightly heads), its teacher (a momentum copy of the student's encoder, or
none) and its criterion, computes the loss on a step's two views, updates the teacher, and carries its own checkpoint
state (teacher weights; MoCo's queue of keys). The loop in alssl/pretraining.py calls these and never asks which method
it runs.

- SimSiam (Chen & He 2021, arXiv 2011.10566): projection + prediction heads, symmetric negative cosine similarity
  with stop-gradient on the target branch; SGD lr 0.05·bs/256 (lightly's CIFAR recipe).
- MoCo v2 (Chen et al. 2020, arXiv 2003.04297): key encoder = momentum copy (m = 0.99, optional cosine schedule to 1),
  a queue of keys (default min(4096, N/2)) and InfoNCE with T = 0.2 (lightly's NTXentLoss with a memory bank).
- BYOL (Grill et al. 2020, arXiv 2006.07733): online network with predictor, target = momentum copy with m
  cosine-scheduled 0.99 → 1, symmetric loss.
- EMAN (Cai et al. 2021, arXiv 2103.16436), `eman=True` for MoCo / BYOL: the teacher is the EMA of the student's
  whole state, BatchNorm running statistics included, and always runs in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules.heads import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
)
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from alssl.loop import eman_buffers


class Encoder(nn.Module):
    """backbone → projection head; the part a momentum teacher copies."""

    def __init__(self, backbone: nn.Module, projection: nn.Module):
        super().__init__()
        self.backbone, self.projection = backbone, projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, P]
        return self.projection(self.backbone(x))


class SSLNet(nn.Module):
    """The student: encoder (+ predictor for SimSiam / BYOL). forward -> (z projection, p prediction or z)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, prediction: nn.Module | None):
        super().__init__()
        self.prediction = prediction  # registered first: the state dict keeps its historical key order
        self.encoder = Encoder(backbone, projection)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, (self.prediction(z) if self.prediction is not None else z)


@torch.no_grad()
def momentum_update(student: nn.Module, teacher: nn.Module, m: float, *, eman: bool) -> None:
    """θ_t ← m·θ_t + (1−m)·θ_s (lightly's update_momentum); with EMAN also the BN running statistics.

    EMAN averages every floating-point buffer (running mean / var) and copies integer counters; the plain momentum
    encoder keeps its own buffers, as in MoCo's and lightly's code.
    """
    update_momentum(student, teacher, m)
    if eman:
        eman_buffers(teacher, student, m)


class SSLMethod:
    """What a stage-1 method plugs into the loop. Subclasses set the class attributes and `heads`, `loss`."""

    name = ""
    base_lr = 0.05  # per 256 images (lightly's CIFAR-10 benchmark recipes)
    out_dim = 128  # projection size: the collapse monitor's healthy std is about 1/√out_dim
    has_teacher = False  # a momentum teacher (the only kind --eman applies to)
    default_schedule: str | None = None  # the momentum schedule when none is given

    def __init__(self, *, eman: bool = False, momentum: float = 0.99, momentum_schedule: str | None = None,
                 temperature: float = 0.2, queue_size: int | None = None):
        self.eman, self.momentum, self.temperature, self.queue_size = eman, momentum, temperature, queue_size
        self.schedule = momentum_schedule or self.default_schedule
        self.teacher: Encoder | None = None
        self.criterion: nn.Module | None = None

    # ---- build
    def heads(self, dim: int) -> tuple[nn.Module, nn.Module | None]:
        """(projection head, prediction head or None) on a backbone of output size `dim`."""
        raise NotImplementedError

    def student(self, backbone: nn.Module) -> SSLNet:
        """The network the optimizer trains: `backbone` + this method's heads (drawn from the torch RNG)."""
        return SSLNet(backbone, *self.heads(backbone.dim))

    def setup(self, net: SSLNet, n_pool: int) -> None:
        """Teacher (a frozen copy of the student's encoder, after any BN calibration) and criterion."""
        self.teacher = copy.deepcopy(net.encoder).requires_grad_(False) if self.has_teacher else None
        self.criterion = self.make_criterion(n_pool)

    def make_criterion(self, n_pool: int) -> nn.Module:
        return NegativeCosineSimilarity()

    def to(self, device: torch.device) -> "SSLMethod":
        self.criterion = self.criterion.to(device)
        if self.teacher is not None:
            self.teacher = self.teacher.to(device, memory_format=torch.channels_last)
        return self

    def train(self) -> None:
        """Put the teacher in its training mode (EMAN's teacher always runs in eval mode)."""
        if self.teacher is not None:
            self.teacher.train(not self.eman)

    # ---- one step
    def loss(self, net: nn.Module, x0: torch.Tensor, x1: torch.Tensor,
             autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss on two views [B, C, H, W] and the student projections [B, P] (for the collapse monitor).

        `net` is the student as the loop runs it (Fabric's wrapper under DDP); `autocast` (Fabric's) wraps the
        teacher's forward, which runs outside the wrapper.
        """
        raise NotImplementedError

    def momentum_at(self, step: int, total: int) -> float:
        """The teacher's momentum m at `step` of `total`: fixed, or cosine-scheduled from m to 1."""
        return cosine_schedule(step, total, self.momentum, 1.0) if self.schedule == "cosine" else self.momentum

    def update_teacher(self, net: SSLNet, step: int, total: int) -> None:
        """After optimizer step `step`: move the teacher towards the student (nothing without a teacher)."""
        if self.teacher is not None:
            momentum_update(net.encoder, self.teacher, self.momentum_at(step, total), eman=self.eman)

    # ---- checkpoint state (top-level keys of pretrain-state.pt)
    def state_types(self) -> dict[str, type]:
        """The method's keys in a checkpoint and their types (checked before loading)."""
        return {"teacher": dict}

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else {}}

    def load_state_dict(self, saved: dict) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(saved["teacher"])


class SimSiam(SSLMethod):
    name = "simsiam"

    def heads(self, dim: int) -> tuple[nn.Module, nn.Module | None]:  # lightly's CIFAR sizes, input = backbone
        return SimSiamProjectionHead(dim, 512, 128), SimSiamPredictionHead(128, 64, 128)

    def loss(self, net, x0, x1, autocast):  # D(p0, sg(z1))/2 + D(p1, sg(z0))/2
        z0, p0 = net(x0)
        z1, p1 = net(x1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach())), z0


class MoCoV2(SSLMethod):
    name = "moco"
    base_lr = 0.06
    has_teacher = True

    def heads(self, dim: int) -> tuple[nn.Module, nn.Module | None]:
        return MoCoProjectionHead(dim, 512, 128), None

    def make_criterion(self, n_pool: int) -> nn.Module:  # InfoNCE against a queue of past keys (its init draws RNG)
        q = self.queue_size if self.queue_size is not None else min(4096, n_pool // 2)
        return NTXentLoss(temperature=self.temperature, memory_bank_size=(q, 128))

    def loss(self, net, x0, x1, autocast):  # query from view 0, key from view 1 (momentum encoder)
        q, _ = net(x0)
        with torch.no_grad(), autocast():
            k = self.teacher(x1)
        return self.criterion(q, k), q

    def state_types(self) -> dict[str, type]:
        return {**super().state_types(), "queue": torch.Tensor, "queue_ptr": torch.Tensor}

    def state_dict(self) -> dict:
        bank = self.criterion.memory_bank
        return {**super().state_dict(), "queue": bank.bank.detach().cpu(), "queue_ptr": bank.bank_ptr.detach().cpu()}

    def load_state_dict(self, saved: dict) -> None:
        super().load_state_dict(saved)
        self.criterion.memory_bank.bank.copy_(saved["queue"])
        self.criterion.memory_bank.bank_ptr.copy_(saved["queue_ptr"])


class BYOL(SSLMethod):
    name = "byol"
    base_lr = 0.06
    out_dim = 256
    has_teacher = True
    default_schedule = "cosine"  # τ from 0.99 to 1 with a cosine schedule

    def heads(self, dim: int) -> tuple[nn.Module, nn.Module | None]:
        return BYOLProjectionHead(dim, 1024, 256), BYOLPredictionHead(256, 1024, 256)

    def loss(self, net, x0, x1, autocast):  # symmetric: online predictions vs target projections
        with torch.no_grad(), autocast():
            k0, k1 = self.teacher(x0), self.teacher(x1)
        z0, p0 = net(x0)
        z1, p1 = net(x1)
        return 0.5 * (self.criterion(p0, k1) + self.criterion(p1, k0)), z0


METHODS: dict[str, type[SSLMethod]] = {"simsiam": SimSiam, "moco": MoCoV2, "byol": BYOL}
