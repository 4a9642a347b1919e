"""FixMatch (Sohn et al. 2020, arXiv 2001.07685).

    q_b = softmax(f(weak(u_b)))            (stop-gradient)
    ŷ_b = argmax q_b,  mask_b = [max q_b ≥ τ]
    L_u = 1/(μB) Σ_b mask_b · CE(ŷ_b, f(strong(u_b)))
    L   = L_s + λ_u · L_u                  (L_s = CE on weak views of the labeled batch)

Defaults from the paper: τ = 0.95, λ_u = 1, μ = 7, B = 64, SGD-nesterov lr 0.03 with cos(7πk/16K), EMA 0.999.
Knob `bn_batch`: "concat" (default; the official code's one forward of labeled + weak + strong, so BatchNorm sees all
three) or "split" (weak view under torch.no_grad in its own BN batch: ~1/3 less compute, but on digits 40 labels it
lost 3 points on average over 3 seeds — see docs/semi.md).
With `--teacher eman` this is FixMatch-EMAN (Cai et al. 2021, arXiv 2103.16436): q_b comes from the EMAN teacher's
weak-view prediction (eval mode) and the student forwards only the labeled and strong views (`common.forward_views`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alssl.semi.common import Batch, Method, Net, forward_views, masked_ce


def fixmatch_unsup_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, tau: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_u, mask [N], hard pseudo-labels [N]) from weak logits (no gradient) and strong logits [N, K]."""
    probs = torch.softmax(logits_weak.detach(), dim=1)  # [N, K]
    conf, pseudo = probs.max(dim=1)  # [N], [N]
    mask = conf >= tau
    return masked_ce(logits_strong, pseudo, mask), mask, pseudo


class FixMatch(Method):
    name = "fixmatch"

    @classmethod
    def defaults(cls, steps: int, options: dict) -> dict:
        return {"bn_batch": "concat"}

    def loss(self, model: Net, teacher, b: Batch, step: int) -> tuple[torch.Tensor, dict]:
        l_l, l_uw, l_us, *_ = forward_views(model, teacher, b, bn_batch=self.options["bn_batch"])
        loss_s = F.cross_entropy(l_l, b.y_l)
        loss_u, mask, _ = fixmatch_unsup_loss(l_uw, l_us, self.tau)
        loss = loss_s + self.lambda_u * loss_u
        return loss, {"loss_s": loss_s.detach(), "loss_u": loss_u.detach(), "mask": mask.float().mean()}
