"""Plumbing the training loops share (stage 1 alssl/pretraining.py; stage 4 alssl/semi/trainer.py): loading and
checking a training checkpoint, forgetting the metrics lines a resumed loop redoes, the non-finite loss message, the
--minutes deadline across ranks, the DDP weights check and EMAN's buffer rule. Fault injection lives in alssl/faults.py.

None of these owns the loop: each stage keeps its one visible training loop and calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alssl.errors import UserError
from alssl.runs import read_jsonl, torch_load, write_jsonl


def state_problem(saved: Any, *, kind: str, what: str, need: dict[str, type]) -> str | None:
    """What is wrong with a loaded training state — not a dict of this `kind`, a key of `need` missing or of another
    type (an int is never a bool) — or None."""
    if not isinstance(saved, dict) or saved.get("kind") != kind:
        return f"not {what}"
    for key, t in need.items():
        if key not in saved:
            return f"key {key!r} is missing"
        if not isinstance(saved[key], t) or (t is int and isinstance(saved[key], bool)):
            return f"{key} is a {type(saved[key]).__name__}, not a {t.__name__}"
    return None


def load_checkpoint(path: Path, problem: Callable[[Any], str | None], fix: str) -> dict:
    """The checkpoint at `path` (weights_only load); a damaged one (`problem` says why) is a UserError naming `fix`."""
    saved = torch_load(path)
    bad = problem(saved)
    if bad:
        raise UserError(f"{path} is damaged ({bad}); {fix}")
    return saved


@contextmanager
def fitting(path: Path, what: str, fix: str) -> Iterator[None]:
    """Around `load_state_dict` calls: a state that does not fit `what` (wrong shapes or keys) is one UserError."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} does not fit {what} ({str(exc).strip().splitlines()[0][:120]}); {fix}") from None


def truncate_metrics(path: Path, step: int, *, stage: str | None = None) -> None:
    """Forget the lines of `path` (those of `stage`; all when None) logged after `step`, the checkpoint a resumed loop
    goes on from: its later steps are redone and log again, so no line is doubled. `step=-1` forgets them all."""
    records = read_jsonl(path)
    kept = [r for r in records if (stage is not None and r.get("stage") != stage)
            or (type(r.get("step")) is int and r["step"] <= step)]
    if len(kept) != len(records):
        write_jsonl(path, kept)


def non_finite_error(name: str, where: str, kept_in: Path | None, *, what: str = "NaN or inf",
                     last_good: int | None = None, fix: str = "lower --lr") -> UserError:
    """The error for a loss that became NaN / inf: `name` (e.g. "the simsiam loss") became `what` `where`
    ("at step 6"); the last good checkpoint `kept_in` (None: none was written yet); `fix`."""
    if kept_in is None:
        kept = "no checkpoint was written yet"
    else:
        kept = f"the last good checkpoint{'' if last_good is None else f' (step {last_good})'} is kept in {kept_in}"
    return UserError(f"{name} became {what} {where}; {kept}; {fix}")


def non_finite_kind(loss: torch.Tensor) -> str:
    """"NaN" or "inf", for `non_finite_error(what=...)`."""
    return "NaN" if bool(torch.isnan(loss).any()) else "inf"


def past_deadline(deadline: float | None, now: float, fabric=None) -> bool:
    """Whether the wall-clock `deadline` (perf_counter seconds; None: no budget) is past at `now`, decided by rank 0
    for every rank when a multi-process Fabric is given (so all ranks stop after the same step)."""
    if deadline is None:  # the same on every rank: no broadcast
        return False
    late = now > deadline
    if fabric is None or fabric.world_size == 1:
        return late
    return bool(fabric.broadcast(torch.tensor(float(late), device=fabric.device), src=0).item())


def _tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) state dict, list or tuple."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (dict, list, tuple)):
        return [t for v in (x.values() if isinstance(x, dict) else x) for t in _tensors(v)]
    return []


@torch.no_grad()
def ranks_in_sync(fabric, net: nn.Module, *states: Any) -> bool:
    """DDP check: every rank holds bit-identical weights of `net` and tensors of `states` (more state dicts: stage 4
    adds the student's buffers, the teacher and the method state), in one all_gather of the flat vector."""
    import torch.distributed as dist

    tensors = list(net.parameters()) + _tensors(states)
    flat = torch.cat([t.detach().float().flatten().to(fabric.device) for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(fabric.world_size)]
    dist.all_gather(parts, flat)  # (Fabric's all_gather goes through a deprecated autograd wrapper)
    gathered = torch.stack(parts)  # [world, P]
    return bool((gathered - gathered[0]).abs().max().item() == 0.0)


@torch.no_grad()
def eman_buffers(teacher: nn.Module, student: nn.Module, m: float, *, lerp: bool = False) -> None:
    """EMAN's buffer rule (Cai et al. 2021), both stages: the teacher's floating-point buffers (BN running mean / var)
    move to m·t + (1−m)·s, integer counters are copied. `lerp`: as `torch.lerp` (stage 4's arithmetic), else
    `t.mul_(m).add_(s, alpha=1−m)` (stage 1's); the two differ in the last bit, so each caller keeps its own."""
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if not tb.is_floating_point():
            tb.copy_(sb)
        elif lerp:
            tb.lerp_(sb, 1.0 - m)
        else:
            tb.mul_(m).add_(sb, alpha=1.0 - m)
