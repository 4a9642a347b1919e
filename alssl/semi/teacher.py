"""Teachers (EMA / EMAN) and distribution alignment.

- EMA (Tarvainen & Valpola 2017, arXiv 1703.01780; FixMatch's evaluation model): θ' ← m_t·θ' + (1−m_t)·θ for the
  parameters, with m_t = min(m, (1 + t) / (10 + t)) after the t-th update (TensorFlow's ExponentialMovingAverage
  `num_updates` warm-up). Without it a short run is useless: after 500 steps at m = 0.999 the teacher still holds
  0.999^500 = 61 % of the initial weights (random head) and scored 10 % on digits; the warm-up reaches m = 0.999 at
  t ≈ 9000, so paper-length runs are unchanged. Buffers (BN running mean/var, num_batches_tracked) are copied from
  the student. During training its forward passes use train-mode BN (batch statistics), as in SimMatch's and DASO's
  official code; evaluation uses eval mode.
- EMAN (Cai et al. 2021, arXiv 2103.16436): the EMA runs over the whole state, BN running statistics included
  (num_batches_tracked copied), and the teacher is ALWAYS in eval mode, so its outputs for a sample never depend on
  the other samples in the batch.
- Distribution alignment (ReMixMatch, arXiv 1911.09785): p ← normalize(p · p_target / mean(p_model)), where
  mean(p_model) is the mean of the last `length` batch-mean predictions (a queue, as ReMixMatch's "last 128 batches",
  USB's DistAlignQueueHook; SimMatch uses 32 on CIFAR).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from alssl.loop import eman_buffers

TEACHERS = ("ema", "eman")


class Teacher(nn.Module):
    """A frozen copy of the student updated by exponential moving average after every optimizer step."""

    def __init__(self, student: nn.Module, *, kind: str = "ema", decay: float = 0.999):
        super().__init__()
        assert kind in TEACHERS, kind
        self.kind, self.decay = kind, decay
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "Teacher":
        # EMAN's teacher never leaves eval mode; the EMA teacher follows the trainer (train-mode BN while training).
        self.training = mode
        self.model.train(mode and self.kind == "ema")
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def decay_at(self, step: int) -> float:
        """m_t = min(m, (1 + t) / (10 + t)) for the update after optimizer step t (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """One EMA step towards `student` (call after optimizer step `step`, 0-based)."""
        m = self.decay_at(step)
        t_params = list(self.model.parameters())
        s_params = list(student.parameters())
        torch._foreach_lerp_(t_params, s_params, 1.0 - m)  # θ' += (1−m)(θ − θ') = m·θ' + (1−m)·θ
        if self.kind == "eman":
            eman_buffers(self.model, student, m, lerp=True)  # running mean / var averaged too, counters copied
        else:
            for tb, sb in zip(self.model.buffers(), student.buffers()):
                tb.copy_(sb)  # EMA: buffers copied


class DistAlign:
    """ReMixMatch distribution alignment with a queue of the last `length` batch means of p_model."""

    def __init__(self, num_classes: int, *, length: int = 128, p_target: torch.Tensor | None = None):
        self.length = length
        self.p_target = torch.full((num_classes,), 1.0 / num_classes) if p_target is None else p_target.float()
        self.queue = torch.zeros(length, num_classes)  # [L, K]
        self.count = 0  # batches seen (the queue holds min(count, L) of them)

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor, average=None) -> torch.Tensor:  # [B, K] -> [B, K]
        """`average`: the mean over ranks (DDP), so the queue holds the global batch's mean on every rank."""
        self.queue = self.queue.to(probs.device)
        self.p_target = self.p_target.to(probs.device)
        batch_mean = probs.mean(0)  # [K]
        self.queue[self.count % self.length] = batch_mean if average is None else average(batch_mean)
        self.count += 1
        p_model = self.queue[: min(self.count, self.length)].mean(0)  # [K]
        out = probs * self.p_target / p_model.clamp_min(1e-12)
        return out / out.sum(1, keepdim=True)

    def state_dict(self) -> dict:
        return {"queue": self.queue.cpu(), "count": self.count, "p_target": self.p_target.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.queue, self.count, self.p_target = state["queue"].clone(), int(state["count"]), state["p_target"].clone()
