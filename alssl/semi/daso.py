"""DASO (Oh et al. 2022, arXiv 2106.05682): distribution-aware semantics-oriented pseudo-labels, on top of FixMatch.

- Balanced prototypes: one FIFO queue per class (size L = 256, equal for all classes) of EMA-teacher encoder
  features of labeled samples (the official code pushes the labeled batch every step); prototype c_k = mean of Q_k.
- Semantic pseudo-label of an unlabeled weak view with student features z (no gradient):
      q = softmax_k(cos(z, c_k) / T_proto)
- Distribution-aware blend with the linear pseudo-label p = softmax(f(weak(u))):
      π̂ = class distribution of the final pseudo-labels (argmax) over the last `daso_dist_period` (100) steps
      v_k = π̂_k^(1/T_dist) / max_j π̂_j^(1/T_dist),   k̂ = argmax p
      p' = (1 − v_k̂)·p + v_k̂·q        — classes the model over-predicts lean on the semantic q
- L_u (FixMatch on p'): 1/(μB) Σ [max p' ≥ τ] · CE(argmax p', f(strong(u)))
- Semantic alignment: L_align = 1/(μB) Σ H(q, softmax_k(cos(z^s, c_k)/T_proto)),
  z^s = student features of the strong view
- L = L_s + λ_u·L_u + λ_align·L_align; the first `daso_warmup` steps are plain FixMatch (official: 5000 of 250k).

Ordering (fixes USB's one-step-late semantic pseudo-label): at step t the labeled EMA features of step t are pushed
into the queues FIRST, then the prototypes are taken and the semantic pseudo-labels of THIS step's unlabeled batch are
computed and blended — as in the official implementation. (USB's DASO hook blends the linear pseudo-labels of batch t
with `probs_sim` left over from batch t−1, i.e. the semantic labels of other images.)
With `--teacher eman` (DASO on FixMatch-EMAN): the linear pseudo-label p and the weak features z come from the EMAN
teacher (eval mode), so queues, prototypes and semantic pseudo-labels all live in the teacher's feature space; the
alignment loss still trains the student's strong-view features.
Defaults (official configs): T_proto = 0.05, T_dist = 1.5 when labeled and unlabeled share a profile, 0.3 when the
unlabeled profile is reversed, L = 256, λ_align = 1, π̂ refreshed every 100 steps, and a CONSTANT learning rate
(official `SOLVER.APPLY_SCHEDULER = False`; USB's imbalanced algorithms set `scheduler = None` on CIFAR);
`lr_schedule=cosine` gives FixMatch's schedule instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alssl.semi.common import Batch, Method, Net, forward_views, masked_ce


def daso_blend(p: torch.Tensor, q: torch.Tensor, pl_dist: torch.Tensor, T_dist: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(p' [B, K], v [K]): blend linear p and semantic q with weights v = π̂^(1/T) / max π̂^(1/T) at k̂ = argmax p."""
    v = pl_dist.clamp_min(0) ** (1.0 / T_dist)
    v = v / v.max()  # [K]
    w = v[p.argmax(1)].unsqueeze(1)  # [B, 1]
    return (1.0 - w) * p + w * q, v


def proto_logits(z: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor, T_proto: float) -> torch.Tensor:
    """cos(z, c_k)/T_proto [B, K]; classes with an empty queue get -inf (probability 0)."""
    sim = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T / T_proto  # [B, K]
    return sim.masked_fill(~valid.view(1, -1), float("-inf"))


def daso_align_loss(sim_weak: torch.Tensor, sim_strong: torch.Tensor) -> torch.Tensor:
    """Semantic alignment: mean_b H(softmax(sim_weak), softmax(sim_strong)); the weak side is a fixed target."""
    target = torch.softmax(sim_weak.detach(), dim=1)
    logp = F.log_softmax(sim_strong, dim=1).masked_fill(target == 0, 0.0)  # 0·log0 terms of empty classes
    return -(target * logp).sum(1).mean()


class DASO(Method):
    name = "daso"

    @classmethod
    def defaults(cls, steps: int, options: dict) -> dict:
        reversed_ = options.get("unlabeled_profile") == "reversed"
        return {"bn_batch": "concat", "lr_schedule": "constant", "daso_warmup": max(1, round(0.02 * steps)),
                "daso_T_proto": 0.05, "daso_T_dist": 0.3 if reversed_ else 1.5, "daso_queue": 256,
                "daso_lambda_align": 1.0, "daso_dist_period": 100}

    def __init__(self, **kw):
        super().__init__(**kw)
        o = self.options
        self.warmup, self.T_proto, self.T_dist = (int(o["daso_warmup"]), float(o["daso_T_proto"]),
                                                  float(o["daso_T_dist"]))
        self.L, self.lambda_align, self.period = (int(o["daso_queue"]), float(o["daso_lambda_align"]),
                                                  int(o["daso_dist_period"]))
        self.queue: torch.Tensor | None = None  # [K, L, D] created on the first push (D = feature dim)
        self.queue_len = torch.zeros(self.num_classes, dtype=torch.long)  # [K] filled entries
        self.queue_ptr = torch.zeros(self.num_classes, dtype=torch.long)  # [K] next write position (FIFO ring)
        self.pl_window = torch.zeros(self.num_classes)  # [K] pseudo-label counts since the last π̂ refresh
        self.pl_dist = torch.zeros(self.num_classes)  # [K] π̂ (counts) from the last completed window

    # -- balanced class queues
    @torch.no_grad()
    def push(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Append features [n, D] to their classes' FIFO queues (oldest dropped beyond L)."""
        if self.queue is None:
            self.queue = feats.new_zeros(self.num_classes, self.L, feats.shape[1])
            self.queue_len, self.queue_ptr = self.queue_len.to(feats.device), self.queue_ptr.to(feats.device)
        counts = torch.bincount(labels, minlength=self.num_classes)  # [K]
        order = torch.argsort(labels, stable=True)  # arrival order kept within each class
        lab, f = labels[order], feats[order]
        rank = torch.arange(len(lab), device=lab.device) - (torch.cumsum(counts, 0) - counts)[lab]  # [n] rank in class
        keep = rank >= counts[lab] - self.L  # more than L of one class: only the newest L survive
        slot = (self.queue_ptr[lab] + rank) % self.L
        self.queue[lab[keep], slot[keep]] = f[keep]
        self.queue_ptr = (self.queue_ptr + counts) % self.L
        self.queue_len = torch.clamp(self.queue_len + counts, max=self.L)

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes [K, D] = mean of each queue, valid [K] = queue non-empty)."""
        n = self.queue_len.clamp_min(1).to(self.queue.dtype).view(-1, 1)
        return self.queue.sum(1) / n, self.queue_len > 0  # unfilled slots are zero, so sum/len is the mean

    def current_pl_dist(self) -> torch.Tensor:
        """π̂: the last completed window, else the counts so far, else uniform."""
        for d in (self.pl_dist, self.pl_window):
            if d.sum() > 0:
                return d / d.sum()
        return torch.full_like(self.pl_dist, 1.0 / self.num_classes)

    def loss(self, model: Net, teacher, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        # 1) this step's labeled EMA features go into the queues BEFORE the prototypes are read
        with torch.no_grad():
            _, t_feats = teacher(b.x_l)
        self.push(self.ranks.gather(t_feats), self.ranks.gather(b.y_l))  # every rank's labeled batch, rank order
        # 2) student forward (labeled + strong with grad); weak view without grad, from the EMAN teacher if any
        l_l, l_uw, l_us, _, f_uw, f_us = forward_views(model, teacher, b, bn_batch=self.options["bn_batch"])
        loss_s = F.cross_entropy(l_l, b.y_l)
        p = torch.softmax(l_uw, dim=1)  # [μB, K] linear pseudo-label (no grad)
        logs = {"loss_s": loss_s.detach()}
        loss_align = l_l.new_zeros(())
        if step >= self.warmup:
            protos, valid = self.prototypes()  # built from data up to and including step t
            sim_w = proto_logits(f_uw, protos, valid, self.T_proto)  # [μB, K] no grad
            q = torch.softmax(sim_w, dim=1)
            pl_dist = self.current_pl_dist().to(p.device)
            p, v = daso_blend(p, q, pl_dist, self.T_dist)
            sim_s = proto_logits(f_us, protos, valid, self.T_proto)  # [μB, K] with grad
            loss_align = daso_align_loss(sim_w, sim_s)
            logs["loss_align"] = loss_align.detach()
        conf, pseudo = p.max(1)
        mask = conf >= self.tau
        loss_u = masked_ce(l_us, pseudo, mask)
        # 3) π̂ bookkeeping: counts of the final pseudo-labels, refreshed every `period` steps
        self.pl_window += self.ranks.sum(torch.bincount(pseudo, minlength=self.num_classes)).to(self.pl_window)
        if (step + 1) % self.period == 0:
            self.pl_dist, self.pl_window = self.pl_window.clone(), torch.zeros_like(self.pl_window)
        loss = loss_s + self.lambda_u * loss_u + self.lambda_align * loss_align
        logs.update(loss_u=loss_u.detach(), mask=mask.float().mean())
        return loss, logs

    def state_dict(self) -> dict:
        return {"queue": None if self.queue is None else self.queue.cpu(), "queue_len": self.queue_len.cpu(),
                "queue_ptr": self.queue_ptr.cpu(), "pl_window": self.pl_window.cpu(), "pl_dist": self.pl_dist.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.queue = None if state["queue"] is None else state["queue"].clone()
        self.queue_len, self.queue_ptr = state["queue_len"].clone(), state["queue_ptr"].clone()
        self.pl_window, self.pl_dist = state["pl_window"].clone(), state["pl_dist"].clone()
