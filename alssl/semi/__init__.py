"""Stage 4: semi-supervised fine-tuning from the stage-1 backbone with the labels active learning bought.

Methods (a plain dict registry, name -> class): FixMatch (arXiv 2001.07685), SimMatch (arXiv 2203.06915),
DASO (arXiv 2106.05682), Pseudo-Label (Lee 2013) and supervised-only. All share one loop (`trainer.py`), the weak /
strong views (`views.py`) and the EMA / EMAN teacher + distribution alignment (`teacher.py`). See docs/semi.md.
"""

from __future__ import annotations

from alssl.semi.baselines import PseudoLabel, Supervised
from alssl.semi.common import Method
from alssl.semi.daso import DASO
from alssl.semi.fixmatch import FixMatch
from alssl.semi.simmatch import SimMatch

METHODS: dict[str, type[Method]] = {
    "fixmatch": FixMatch,
    "simmatch": SimMatch,
    "daso": DASO,
    "pseudolabel": PseudoLabel,
    "supervised": Supervised,
}

from alssl.semi.trainer import semi_finetune  # noqa: E402  (needs METHODS at call time only)

__all__ = ["METHODS", "semi_finetune"]
