"""Baselines on the same labels, schedule, views and teacher as the SSL methods.

- Pseudo-Label (Lee 2013, ICML-W "Pseudo-Label: the simple and efficient semi-supervised learning method"): the
  model's own hard prediction on an unlabeled sample is its target, kept when confident (τ, as in USB/DASO's
  baselines); no strong augmentation — prediction and loss use the same weak view in the same forward.
      L = L_s + λ(t)·1/(μB) Σ [max p ≥ τ]·CE(argmax p, f(weak(u))),  λ(t) = λ_u·min(1, t / (pl_rampup·K))
  (Lee's α(t) ramp; pl_rampup = 0.4 as DASO's baseline config.) With `--teacher eman` the pseudo-label and its
  confidence come from the EMAN teacher's prediction on the same weak view (eval mode, as FixMatch-EMAN).
- Supervised: L = L_s on the labeled weak views only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alssl.semi.common import Batch, Method, Net, is_eman, masked_ce


class PseudoLabel(Method):
    name = "pseudolabel"

    @classmethod
    def defaults(cls, steps: int, options: dict) -> dict:
        return {"pl_rampup": 0.4}

    def loss(self, model: Net, teacher, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        B = len(b.y_l)
        logits, _ = model(torch.cat([b.x_l, b.x_uw]))
        loss_s = F.cross_entropy(logits[:B], b.y_l)
        with torch.no_grad():
            weak = teacher(b.x_uw)[0] if is_eman(teacher) else logits[B:]  # [μB, K] source of the pseudo-labels
        conf, pseudo = torch.softmax(weak.detach(), dim=1).max(1)
        mask = conf >= self.tau
        loss_u = masked_ce(logits[B:], pseudo, mask)
        ramp = float(self.options["pl_rampup"]) * self.steps
        weight = self.lambda_u * (min(1.0, step / ramp) if ramp > 0 else 1.0)
        loss = loss_s + weight * loss_u
        return loss, {"loss_s": loss_s.detach(), "loss_u": loss_u.detach(), "mask": mask.float().mean()}


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False

    def loss(self, model: Net, teacher, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        logits, _ = model(b.x_l)
        loss_s = F.cross_entropy(logits, b.y_l)
        return loss_s, {"loss_s": loss_s.detach()}
