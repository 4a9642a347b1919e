"""SimMatch (Zheng et al. 2022, arXiv 2203.06915): semantic + instance similarity with a labeled memory bank.

A labeled memory bank holds the EMA teacher's L2-normalised 128-d projections z_j of every labeled sample (weak
view) and their labels y_j (bank size N = number of labeled samples; row j is refreshed whenever labeled sample j is
in the batch, after the loss is computed). For an unlabeled sample with teacher class probabilities p (after
distribution alignment) and instance similarities

    q^w_j = softmax_j(z^w · z_j / T)     (teacher, weak view)      q^s_j = softmax_j(z^s · z_j / T)   (student, strong)

- label unfolding (instance pseudo-label):   q̂_j = q^w_j · p[y_j] / Σ_i q^w_i · p[y_i]
- label aggregation (class pseudo-label):     a_k = Σ_{j: y_j = k} q^w_j,   p̂ = α·p + (1−α)·a
- L_u  = 1/(μB) Σ mask · H(p̂, softmax(f(strong)))  with mask = [max p̂ ≥ τ]   (soft target, as the official code)
- L_in = 1/(μB) Σ H(q̂, q^s)
- L    = L_s + λ_u·L_u + λ_in·L_in

Defaults (paper §4 / official code): T = 0.1 (teacher and student), α = 0.9, λ_in = 1, τ = 0.95, projection head
Linear(D, D)-ReLU-Linear(D, 128); distribution alignment with a uniform target over a queue of the last `da_len` =
32 batch means (USB's CIFAR configs, `da_len: 32`; USB's argparse default and the official ImageNet code use 256).
The teacher forwards cat(labeled weak, unlabeled weak) under no_grad; the student forwards
cat(labeled weak, unlabeled strong) — the weak view never enters the autograd graph (the paper's speed argument).
The bank starts from the initial teacher's embeddings of all labeled samples (the official code starts from random
vectors and skips the instance terms in the first epoch instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alssl.semi.common import Batch, Method, Net, masked_ce
from alssl.semi.teacher import DistAlign


def simmatch_targets(p: torch.Tensor, q_w: torch.Tensor, bank_labels: torch.Tensor, alpha: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(p̂ [B, K], q̂ [B, N]) from class probabilities p [B, K], instance similarities q_w [B, N], bank labels [N]."""
    B, N = q_w.shape
    labels = bank_labels.view(1, N).expand(B, N)  # [B, N]
    unfolded = q_w * p.gather(1, labels)  # label unfolding: scale q_j by p[y_j]
    q_hat = unfolded / unfolded.sum(1, keepdim=True)  # [B, N]
    agg = torch.zeros_like(p).scatter_add_(1, labels, q_w)  # label aggregation: a_k = Σ_{y_j=k} q_j   [B, K]
    p_hat = alpha * p + (1.0 - alpha) * agg  # [B, K]
    return p_hat, q_hat


class SimMatch(Method):
    name = "simmatch"

    @classmethod
    def defaults(cls, steps: int, options: dict) -> dict:
        return {"simmatch_T": 0.1, "simmatch_alpha": 0.9, "simmatch_lambda_in": 1.0, "proj_dim": 128, "da_len": 32}

    def __init__(self, **kw):
        super().__init__(**kw)
        o = self.options
        self.proj_dim = int(o["proj_dim"])
        self.T, self.alpha, self.lambda_in = (float(o["simmatch_T"]), float(o["simmatch_alpha"]),
                                              float(o["simmatch_lambda_in"]))
        self.da = DistAlign(self.num_classes, length=int(o["da_len"]))
        n = len(self.labeled_y)
        self.bank = torch.zeros(n, self.proj_dim)  # [N, P] teacher embeddings of the labeled samples
        self.bank_labels = self.labeled_y.clone()  # [N]

    @torch.no_grad()
    def setup(self, model: Net, teacher, labeled_weak: torch.Tensor) -> None:
        chunks = [teacher.model.embed(teacher(x)[1]) for x in labeled_weak.split(1024)]
        self.bank = torch.cat(chunks)  # [N, P]
        self.bank_labels = self.bank_labels.to(self.bank.device)

    def loss(self, model: Net, teacher, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        B = len(b.y_l)
        bank, bank_labels = self.bank.clone(), self.bank_labels  # the loss sees the bank as it was before this step
        with torch.no_grad():
            t_logits, t_feats = teacher(torch.cat([b.x_l, b.x_uw]))
            t_emb = teacher.model.embed(t_feats)  # [B + μB, P]
            p = self.da(torch.softmax(t_logits[B:], dim=1), self.ranks.mean)  # [μB, K] teacher probabilities, aligned
            q_w = torch.softmax(t_emb[B:] @ bank.T / self.T, dim=1)  # [μB, N]
            with torch.autocast(p.device.type, enabled=False):  # the targets in float32, also under bf16-mixed
                p_hat, q_hat = simmatch_targets(p.float(), q_w.float(), bank_labels, self.alpha)
        logits, _, emb_s = model(torch.cat([b.x_l, b.x_us]), project_from=B)  # emb_s [μB, P] student, strong
        loss_s = F.cross_entropy(logits[:B], b.y_l)
        mask = p_hat.max(1).values >= self.tau
        loss_u = masked_ce(logits[B:], p_hat, mask)
        log_q_s = F.log_softmax(emb_s @ bank.T / self.T, dim=1)  # [μB, N]
        loss_in = -(q_hat * log_q_s).sum(1).mean()
        self._refresh(self.ranks.gather(b.i_l), self.ranks.gather(t_emb[:B]))  # every rank's labeled rows
        loss = loss_s + self.lambda_u * loss_u + self.lambda_in * loss_in
        return loss, {"loss_s": loss_s.detach(), "loss_u": loss_u.detach(), "loss_in": loss_in.detach(),
                      "mask": mask.float().mean()}

    @torch.no_grad()
    def _refresh(self, idx: torch.Tensor, emb: torch.Tensor) -> None:
        """Overwrite bank rows `idx` [B] with this step's teacher embeddings [B, P]. A batch that crosses an epoch
        boundary can hold a sample twice; its last row wins (index_put with repeated indices is nondeterministic)."""
        rows, inv = torch.unique(idx, return_inverse=True)
        pos = torch.arange(len(idx), device=idx.device)
        last = torch.zeros(len(rows), dtype=torch.long, device=idx.device).scatter_reduce_(0, inv, pos, reduce="amax")
        self.bank[rows] = emb[last].to(self.bank.dtype)

    def state_dict(self) -> dict:
        return {"bank": self.bank.cpu(), "bank_labels": self.bank_labels.cpu(), "da": self.da.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.bank, self.bank_labels = state["bank"].clone(), state["bank_labels"].clone()
        self.da.load_state_dict(state["da"])
