"""Pieces every method shares: the classifier network, the batch record and the method interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Backbone + linear classifier (+ an optional 2-layer projection head, as SimMatch adds).

    forward(x) -> (logits [B, K], features [B, D]); `embed(features)` -> L2-normalised projection [B, P].
    forward(x, project_from=s) also returns embed(features[s:]): a student's projection computed inside forward, so
    that a DDP-wrapped student (Fabric, several processes) sees one forward per backward.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, proj_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.dim)
        self.head = nn.Linear(dim, num_classes)
        self.proj = None if proj_dim is None else nn.Sequential(nn.Linear(dim, dim), nn.ReLU(),
                                                                nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor, project_from: int | None = None) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(x)  # [B, D]
        if project_from is None:
            return self.head(feats), feats  # [B, K], [B, D]
        return self.head(feats), feats, self.embed(feats[project_from:])  # ..., [B - s, P]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, P], unit length
        assert self.proj is not None, "this network has no projection head"
        return F.normalize(self.proj(feats), dim=1)


@dataclass
class Batch:
    """One step's inputs, already augmented and normalised on the training device."""

    x_l: torch.Tensor  # [B, C, H, W] weak view of labeled samples
    y_l: torch.Tensor  # [B] labels
    i_l: torch.Tensor  # [B] position of each labeled sample in the labeled set (0..n_labeled-1)
    x_uw: torch.Tensor | None = None  # [μB, C, H, W] weak view of unlabeled samples
    x_us: torch.Tensor | None = None  # [μB, C, H, W] strong view of the same unlabeled samples


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ALL rows of mask·CE (FixMatch's normalisation by μB, not by the number of confident rows).

    `target` is hard labels [N] or a soft distribution [N, K].
    """
    if target.dim() == 1:
        ce = F.cross_entropy(logits, target, reduction="none")
    else:
        ce = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return (ce * mask.float()).mean()


def student_forward(model: Net, b: Batch, *, bn_batch: str = "concat") -> tuple[torch.Tensor, ...]:
    """Student logits and features for the labeled, unlabeled-weak and unlabeled-strong views.

    bn_batch="concat" (default): one forward of cat(labeled, weak, strong), as FixMatch's official code does (BN
    statistics over all three); weak outputs detached. bn_batch="split": the weak view is forwarded under
    torch.no_grad() in its own train-mode BN batch, and only cat(labeled, strong) is kept for backward — the same
    weights and the same loss (pseudo-labels are a stop-gradient in both), ~1/3 less compute; but the BN batch
    composition differs (strong views are normalised by strong-dominated statistics), which cost FixMatch 3 points
    on digits (docs/semi.md), so it is opt-in.
    Returns (logits_l, logits_uw, logits_us, feats_l, feats_uw, feats_us); *_uw carry no gradient.
    """
    B, U = len(b.y_l), len(b.x_uw)
    if bn_batch == "concat":
        logits, feats = model(torch.cat([b.x_l, b.x_uw, b.x_us]))
        l_l, l_uw, l_us = logits.split([B, U, U])
        f_l, f_uw, f_us = feats.split([B, U, U])
        return l_l, l_uw.detach(), l_us, f_l, f_uw.detach(), f_us
    with torch.no_grad():
        l_uw, f_uw = model(b.x_uw)
    logits, feats = model(torch.cat([b.x_l, b.x_us]))
    l_l, l_us = logits.split([B, U])
    f_l, f_us = feats.split([B, U])
    return l_l, l_uw, l_us, f_l, f_uw, f_us


def is_eman(teacher) -> bool:
    """True for an EMAN teacher (`teacher.py`): its weak-view predictions are the pseudo-labels (FixMatch-EMAN)."""
    return getattr(teacher, "kind", "ema") == "eman"


def forward_views(model: Net, teacher: nn.Module, b: Batch, *, bn_batch: str = "concat") -> tuple[torch.Tensor, ...]:
    """Logits and features of the three views; the weak view goes through whichever network gives the pseudo-labels.

    EMA teacher: `student_forward` (the student predicts its own pseudo-labels, as FixMatch and USB do).
    EMAN teacher: FixMatch-EMAN (Cai et al. 2021, arXiv 2103.16436, §3.3; official `models/fixmatch.py`): the weak
    view goes through the teacher (always in eval mode, no gradient) and the student forwards cat(labeled, strong)
    only; `bn_batch` does not apply.
    Returns (logits_l, logits_uw, logits_us, feats_l, feats_uw, feats_us); *_uw carry no gradient.
    """
    if not is_eman(teacher):
        return student_forward(model, b, bn_batch=bn_batch)
    B, U = len(b.y_l), len(b.x_us)
    with torch.no_grad():
        l_uw, f_uw = teacher(b.x_uw)  # [μB, K], [μB, D] teacher predictions, eval-mode BN
    logits, feats = model(torch.cat([b.x_l, b.x_us]))
    l_l, l_us = logits.split([B, U])
    f_l, f_us = feats.split([B, U])
    return l_l, l_uw, l_us, f_l, f_uw, f_us


class Ranks:
    """Collectives over the training processes, for the method state every rank must hold alike (SimMatch's bank,
    DASO's queues and pseudo-label counts, distribution alignment's running mean). This one-process default returns
    its input untouched (no copy, no Fabric); `trainer.FabricRanks` does the real thing under DDP."""

    world = 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:  # [n, ...] -> [world·n, ...], rank 0's rows first
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:  # elementwise sum over ranks
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:  # elementwise mean over ranks
        return t


class Method:
    """What a method plugs into the trainer. Subclasses set `name`, `uses_unlabeled`, `proj_dim`.

    Under DDP every rank gets its shard of the global batch in `loss`; state that outlives a step is updated from the
    whole global batch through `self.ranks` (set by the trainer), so it stays identical on every rank."""

    name = ""
    uses_unlabeled = True
    proj_dim: int | None = None
    ranks: Ranks = Ranks()

    def __init__(self, *, num_classes: int, labeled_y: torch.Tensor, steps: int, tau: float, lambda_u: float,
                 options: dict):
        self.num_classes, self.labeled_y, self.steps = num_classes, labeled_y, steps
        self.tau, self.lambda_u = tau, lambda_u
        self.options = options

    def setup(self, model: Net, teacher: nn.Module, labeled_weak: torch.Tensor) -> None:
        """Called once before step 0 of a fresh run (not on resume) with weak views of all labeled samples."""

    def loss(self, model: Net, teacher: nn.Module, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Method":
        """Move tensor state (banks, queues) to `device`."""
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # every method's knobs with defaults; the trainer rejects unknown option keys with a suggestion
    @classmethod
    def defaults(cls, steps: int, options: dict) -> dict:
        return {}
