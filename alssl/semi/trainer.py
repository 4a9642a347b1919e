"""The stage-4 loop: one visible training loop shared by every method, resumable, with atomic checkpoints.

Per step k (of K): draw the labeled batch (B) and unlabeled batch (μB) — deterministic functions of (seed, k) —
make the weak / strong views on the device (on a worker thread, one step ahead: alssl/prefetch.py), ask the method
for its loss, check it is finite, backward, SGD step (nesterov, momentum 0.9, lr·cos(7πk/(16K)) — constant for DASO,
as its official code — no weight decay on biases and norm parameters, as FixMatch), EMA/EMAN teacher update. Every
`ckpt_every` steps `state.pt` (model, teacher, optimizer, method state, step) is written atomically; a rerun with
the same arguments resumes from it and ends with the same weights as an uninterrupted run, because the torch RNG
is re-seeded from (seed, k) at the start of every step (no RNG stream to carry across a kill).

`semi_finetune` reads setup (validate, index sets, fingerprint, launch) → `_build` → `_resume` → `_train` (the loop)
→ `_finish`. With devices > 1 the same loop runs as DDP through Lightning Fabric: rank r of N takes the slice r of
the global batch (B/N labeled, μB/N unlabeled; its views seeded from (seed, k, r)), DDP averages the gradients, the
student's BN buffers are averaged after each step, and the method updates its cross-step state (SimMatch's bank,
DA's queue, DASO's queues and counts) from every rank's batch (`Method.ranks`), so student, teacher and method state
stay bit-identical on every rank; rank 0 alone writes files. One device is plain torch, as before (docs/scale.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl.backbones import build_backbone, load_backbone_checkpoint, load_init_weights
from alssl.data import PoolReader
from alssl.errors import UserError, check_positive, check_seed, unknown
from alssl.faults import fault_after_steps
from alssl.loop import (fitting, load_checkpoint, non_finite_error, non_finite_kind, past_deadline, ranks_in_sync,
                        state_problem, truncate_metrics)
from alssl.prefetch import ahead
from alssl.runs import append_jsonl, atomic_torch_save, atomic_write_text, check_writable
from alssl.semi.common import Batch, Method, Net, Ranks
from alssl.semi.teacher import TEACHERS, Teacher
from alssl.semi.views import views_for

COMMON_OPTIONS = {"unlabeled_profile": "same", "unlabeled_imbalance": None, "hflip": None,  # hflip None: colour only
                  "lr_schedule": "cosine"}  # a method's defaults() may override (DASO: constant, as its official code)
OPTION_TYPES = {"unlabeled_imbalance": float, "hflip": bool}  # options whose default (None) does not show their type
LR_SCHEDULES = ("cosine", "constant")


# ---------------------------------------------------------------- small pure helpers
def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """FixMatch's schedule: lr·cos(7πk / (16K))."""
    return base_lr * math.cos(7.0 * math.pi * step / (16.0 * total))


def lr_at(base_lr: float, step: int, total: int, schedule: str) -> float:
    """The learning rate of step k: FixMatch's cosine, or constant (DASO's official code and USB's imbalanced
    algorithms keep lr fixed: `SOLVER.APPLY_SCHEDULER = False`, `scheduler = None`)."""
    return cosine_lr(base_lr, step, total) if schedule == "cosine" else base_lr


@functools.lru_cache(maxsize=8)
def _perm(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def stream_batch(n: int, size: int, step: int, *, seed: int, stream: int) -> np.ndarray:
    """Positions [size] of batch `step` in an endless run of fresh permutations of range(n) (epochs of n)."""
    start, stop = step * size, (step + 1) * size
    parts = [_perm(n, seed, stream, e) for e in range(start // n, (stop - 1) // n + 1)]
    return np.concatenate(parts)[start - (start // n) * n: stop - (start // n) * n]


def shape_unlabeled(idx: np.ndarray, y: np.ndarray, *, num_classes: int, profile: str, gamma: float | None,
                    seed: int) -> np.ndarray:
    """Subsample the unlabeled pool `idx` (with its ground truth `y` — a SIMULATION, as in DASO's experiments) to an
    exponential class profile with imbalance `gamma`: "same" keeps the pool's class order (most frequent class first),
    "reversed" gives the pool's rarest class the most unlabeled samples (DASO's γ_u reversed setting).
    gamma None = the pool's own max/min ratio. Returns sorted absolute indices."""
    counts = np.bincount(y, minlength=num_classes)
    present = np.flatnonzero(counts)
    if profile == "same" and gamma is None:
        return idx
    order = present[np.lexsort((present, -counts[present]))]  # most frequent first (ties: class id)
    if profile == "reversed":
        order = order[::-1]
    if gamma is None:
        gamma = counts[present].max() / counts[present].min()
    m = len(order)
    ratio = np.array([gamma ** (-(r / (m - 1))) if m > 1 else 1.0 for r in range(m)])  # [m], 1 .. 1/γ
    n_max = int(np.floor(min(counts[k] / ratio[r] for r, k in enumerate(order))))
    rng = np.random.default_rng([seed, 7])
    keep = []
    for r, k in enumerate(order):
        members = idx[y == k]
        keep.append(rng.choice(members, size=max(1, int(n_max * ratio[r])), replace=False))
    return np.sort(np.concatenate(keep))


def per_class_recall(pred: np.ndarray, y: np.ndarray, num_classes: int) -> list[float | None]:
    """Recall of each class on the test split (None for a class with no test sample)."""
    out: list[float | None] = []
    for k in range(num_classes):
        sel = y == k
        out.append(float((pred[sel] == k).mean()) if sel.any() else None)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x_test: torch.Tensor, y_test: np.ndarray, *, num_classes: int, mean: torch.Tensor,
             std: torch.Tensor, device: torch.device, batch: int = 1024) -> dict:
    """Accuracy, balanced accuracy and per-class recall of `model` (eval mode) on uint8 test images [N, C, H, W]."""
    was = model.training
    model.eval()
    preds = []
    for i in range(0, len(x_test), batch):
        xb = (x_test[i: i + batch].to(device).float() / 255.0 - mean) / std
        logits = model(xb)[0]
        preds.append(logits.argmax(1).cpu())
    model.train(was)
    pred = torch.cat(preds).numpy()
    recall = per_class_recall(pred, y_test, num_classes)
    present = [r for r in recall if r is not None]
    return {"accuracy": float((pred == y_test).mean()), "balanced_accuracy": float(np.mean(present)),
            "per_class_recall": recall}


PRECISIONS = ("32-true", "bf16-mixed")  # 16-mixed would need a GradScaler; not offered


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f'unknown device "{name}"; use auto, cpu, cuda or cuda:N') from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available here; use --accelerator cpu")
    return dev


def _resolve_options(cls: type[Method], steps: int, options: dict | None) -> dict:
    given = {k: v for k, v in (options or {}).items() if v is not None}
    defaults = {**COMMON_OPTIONS, **cls.defaults(steps, given)}
    for k in given:
        if k not in defaults:
            raise unknown(f"option for method {cls.name}", k, defaults)
    for k, v in given.items():
        _check_option(k, v, OPTION_TYPES.get(k) or type(defaults[k]))
        if re.search(r"(^|_)T(_|$)", k):  # a temperature (simmatch_T, daso_T_proto, daso_T_dist): 0 divides by zero
            check_positive(v, f"option {k}", f"--option {k}={defaults[k]}")
    opts = {**defaults, **given}
    if opts["unlabeled_profile"] not in ("same", "reversed"):
        raise unknown("unlabeled profile", str(opts["unlabeled_profile"]), ["same", "reversed"])
    if opts["unlabeled_imbalance"] is not None and not (float(opts["unlabeled_imbalance"]) >= 1):
        raise UserError(f"unlabeled_imbalance must be a ratio >= 1, got {opts['unlabeled_imbalance']}")
    if opts["lr_schedule"] not in LR_SCHEDULES:
        raise unknown("lr_schedule", str(opts["lr_schedule"]), LR_SCHEDULES)
    if "bn_batch" in opts and opts["bn_batch"] not in ("split", "concat"):
        raise unknown("bn_batch", str(opts["bn_batch"]), ["split", "concat"])
    return opts


def _check_option(key: str, value, kind: type) -> None:
    """An option value must have its default's type: bool options take only true/false, numbers are finite, >= 0."""
    if kind is bool:
        ok, want = type(value) is bool, "true or false"
    elif kind is int:
        ok, want = type(value) is int and value >= 0, "an integer >= 0"
    elif kind is float:
        ok = type(value) in (int, float) and math.isfinite(value) and value >= 0
        want = "a number >= 0"
    else:
        ok, want = isinstance(value, kind), f"a {kind.__name__}"
    if not ok:
        raise UserError(f"option {key} must be {want}, got {value!r}; write e.g. --option {key}="
                        f"{'true' if kind is bool else 'split' if key == 'bn_batch' else '1'}")


def _check_args(*, steps, batch_size, mu, tau, lambda_u, lr, weight_decay, ema_decay, ckpt_every, eval_every,
                seed=0) -> None:
    check_seed(seed, "seed")
    checks = [
        (isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch size must be an integer >= 1, got {batch_size}"),
        (isinstance(mu, int) and mu >= 1, f"mu must be an integer >= 1, got {mu}"),
        (0.0 <= tau <= 1.0, f"tau must be in [0, 1], got {tau}"),
        (math.isfinite(lambda_u) and lambda_u >= 0, f"lambda_u must be >= 0, got {lambda_u}"),
        (math.isfinite(lr) and lr > 0, f"lr must be a positive number, got {lr}"),
        (math.isfinite(weight_decay) and weight_decay >= 0, f"weight decay must be >= 0, got {weight_decay}"),
        (0.0 <= ema_decay < 1.0, f"ema decay must be in [0, 1), got {ema_decay}"),
        (isinstance(ckpt_every, int) and ckpt_every >= 1, f"ckpt_every must be an integer >= 1, got {ckpt_every}"),
        (isinstance(eval_every, int) and eval_every >= 0, f"eval_every must be an integer >= 0, got {eval_every}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg + "; fix the value and rerun")


def _check_indices(n_pool: int, num_classes: int, labeled_idx, labeled_y, unlabeled_idx) -> tuple[np.ndarray, ...]:
    li = np.asarray(labeled_idx).reshape(-1)
    ly = np.asarray(labeled_y).reshape(-1)
    if len(li) == 0:
        raise UserError("no labeled samples; label some first (`alssl query` then `alssl label`)")
    if li.dtype.kind not in "iu" or ly.dtype.kind not in "iu":
        raise UserError("labeled indices and labels must be integers")
    if len(li) != len(ly):
        raise UserError(f"{len(li)} labeled indices but {len(ly)} labels; pass one label per index")
    if li.min() < 0 or li.max() >= n_pool:
        raise UserError(f"labeled index out of range 0..{n_pool - 1}; indices are absolute training-pool indices")
    if len(np.unique(li)) != len(li):
        raise UserError("labeled indices contain duplicates; pass each pool index once")
    if ly.min() < 0 or ly.max() >= num_classes:
        raise UserError(f"labels must be class ids in 0..{num_classes - 1}")
    if unlabeled_idx is None:
        ui = np.setdiff1d(np.arange(n_pool), li)
    else:
        ui = np.asarray(unlabeled_idx).reshape(-1)
        if len(ui) and (ui.dtype.kind not in "iu" or ui.min() < 0 or ui.max() >= n_pool):
            raise UserError(f"unlabeled indices must be integers in 0..{n_pool - 1}")
        if len(np.unique(ui)) != len(ui):
            raise UserError("unlabeled indices contain duplicates; pass each pool index once")
        if np.intersect1d(ui, li).size:
            raise UserError("unlabeled indices overlap the labeled ones; pass disjoint sets")
        ui = np.sort(ui)
    return li.astype(np.int64), ly.astype(np.int64), ui.astype(np.int64)


def array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and BN affine parameters
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


# ---------------------------------------------------------------- processes (DDP through Lightning Fabric)
class FabricRanks(Ranks):
    """`Ranks` over Fabric's process group (DDP): gather and reduce across every rank."""

    def __init__(self, fabric):
        self.fabric, self.world = fabric, fabric.world_size

    def gather(self, t: torch.Tensor) -> torch.Tensor:  # [n, ...] -> [world·n, ...], rank 0's rows first
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())  # (Fabric's all_gather goes through a deprecated autograd wrapper)
        return torch.cat(parts)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(t.clone(), reduce_op="sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(t.clone(), reduce_op="mean")


def _launch(device: str, devices: int, precision: str, batch_size: int, num_nodes: int = 1):
    """(fabric or None, torch device, rank, world). One device: plain torch on `_device(device)` (Fabric not
    imported; the same code as before DDP existed). devices > 1: Fabric's DDP strategy launches the other ranks by
    re-running this command line (as stage 1), gloo on a CPU, NCCL on GPUs; `batch_size` is the global batch.
    num_nodes > 1: the same, on every node (world = devices · num_nodes)."""
    if precision not in PRECISIONS:
        raise unknown("precision", precision, PRECISIONS)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise UserError(f"devices must be an integer >= 1, got {devices!r}; e.g. --devices 1")
    if num_nodes < 1:
        raise UserError(f"num_nodes must be an integer >= 1, got {num_nodes!r}; e.g. --num-nodes 1")
    world = devices * num_nodes
    if world == 1:
        return None, _device(device), 0, 1
    accelerator = {"gpu": "cuda"}.get(device, device)
    if accelerator not in ("auto", "cpu", "cuda", "mps"):
        raise UserError(f'--devices {devices} needs --accelerator auto, cpu or cuda (not "{device}"); Fabric picks '
                        "the devices")
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} does not split over {world} devices (the batch size is the "
                        f"global batch); use a multiple of {world}")
    import inspect

    from lightning_fabric.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    from alssl import devices as dev

    # no buffer broadcast at every forward (USB's choice too): the trainer averages the BN buffers after each step
    # (torch 2.14 renamed DDP's `broadcast_buffers` to `forward_sync_buffers` and warns about the old name)
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    fabric = dev.fabric(dev.Devices(accelerator, devices, precision, num_nodes),
                        strategy=DDPStrategy(**{flag: False}))
    fabric.launch()
    return fabric, fabric.device, fabric.global_rank, fabric.world_size


@torch.no_grad()
def _average_buffers(net: nn.Module, ranks: Ranks) -> None:
    """DDP: the mean over ranks of the student's float buffers (BN running mean / var), after every optimizer step,
    so the student and the teacher (which copies or averages them) stay identical on every rank."""
    bufs = [b for b in net.buffers() if b.is_floating_point()]
    if bufs:  # one all-reduce for all of them
        mean = ranks.mean(torch.cat([b.flatten() for b in bufs]))
        for b, v in zip(bufs, mean.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


# ---------------------------------------------------------------- setup, resume, loop, finish
def _fingerprint(*, method, backbone, init_checkpoint, init_weights, steps, batch_size, mu, tau, lambda_u, lr,
                 weight_decay, teacher, ema_decay, seed, opts, li, ly, ui) -> dict:
    """What a checkpoint must have been made with to be resumed (devices and precision are not in it)."""
    init_sha = None
    if init_checkpoint is not None:
        init_sha = (hashlib.sha256(Path(init_checkpoint).read_bytes()).hexdigest()[:16]
                    if Path(init_checkpoint).exists() else None)
    if init_weights is not None and init_weights != "hub":
        p = Path(init_weights).expanduser()
        init_sha = "weights:" + (hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else str(p))
    elif init_weights == "hub":
        init_sha = "hub"
    return {"method": method, "backbone": backbone if init_checkpoint is None else None, "init": init_sha,
            "steps": steps, "batch_size": batch_size, "mu": mu, "tau": tau, "lambda_u": lambda_u, "lr": lr,
            "weight_decay": weight_decay, "teacher": teacher, "ema_decay": ema_decay, "seed": seed,
            "options": json.dumps(opts, sort_keys=True, default=str), "labeled": array_digest(li, ly),
            "unlabeled": array_digest(ui)}


def _index_sets(dataset, cls: type[Method], opts: dict, labeled_idx, labeled_y, unlabeled_idx, seed: int):
    """(labeled indices, their labels, unlabeled indices), checked, the unlabeled set reshaped if asked."""
    K = dataset.num_classes
    li, ly, ui = _check_indices(dataset.n_pool, K, labeled_idx, labeled_y, unlabeled_idx)
    if len(ui) and (opts["unlabeled_profile"] != "same" or opts["unlabeled_imbalance"] is not None):
        if not dataset.has_ground_truth:
            raise UserError("unlabeled_profile / unlabeled_imbalance reshape the pool with its ground truth (a "
                            "simulation); an unlabeled image folder has none, so leave them out")
        ui = shape_unlabeled(ui, dataset.y_train[ui], num_classes=K, profile=opts["unlabeled_profile"],
                             gamma=opts["unlabeled_imbalance"], seed=seed)
    if cls.uses_unlabeled and len(ui) == 0:
        raise UserError(f"method {cls.name} needs unlabeled samples but the pool has none left; use --method "
                        f"supervised")
    return li, ly, ui


@dataclass
class _Parts:
    """The training objects of one process. `model` is what the loss calls: `net` itself, or under DDP Fabric's
    wrapper around it (same parameters); the teacher, the optimizer state and the checkpoints use `net`."""

    net: Net
    model: nn.Module
    ema: Teacher
    opt: torch.optim.Optimizer
    m: Method
    dev: torch.device
    weak: nn.Module
    strong: nn.Module
    rows: PoolReader
    mean: torch.Tensor
    std: torch.Tensor
    backbone: str  # its name (a stage-1 checkpoint says which)

    def norm(self, x: torch.Tensor) -> torch.Tensor:  # [b, C, H, W] in [0, 1] -> normalised
        return (x - self.mean) / self.std

    def images(self, idx: np.ndarray) -> torch.Tensor:  # uint8 pool rows -> float [b, C, H, W] in [0, 1]
        return self.rows(idx).float() / 255.0


def _build(dataset, cls: type[Method], opts: dict, ly: np.ndarray, *, dev, fabric, backbone, init_checkpoint,
           init_weights, steps, tau, lambda_u, lr, weight_decay, teacher, ema_decay, compile, out_dir) -> _Parts:
    """Model, teacher, optimizer, method, views and pixels (call with the torch RNG seeded: same on every rank)."""
    if init_checkpoint is not None:
        bb, ck = load_backbone_checkpoint(init_checkpoint, expect_channels=dataset.channels)
        backbone = ck["backbone"]
    else:
        bb = build_backbone(backbone, dataset.channels)
        if init_weights is not None:
            load_init_weights(bb, backbone, init_weights)
    K = dataset.num_classes
    m = cls(num_classes=K, labeled_y=torch.from_numpy(ly), steps=steps, tau=tau, lambda_u=lambda_u, options=opts)
    net = Net(bb, K, proj_dim=m.proj_dim).to(dev)
    if dev.type == "cpu":  # oneDNN's fast conv layout: ~1.2x per WRN-28-2 step on this CPU (inputs follow)
        net = net.to(memory_format=torch.channels_last)
    ema = Teacher(net, kind=teacher, decay=ema_decay)
    if compile:
        net.backbone.compile()  # in place (state dict keys unchanged); the teacher stays eager
    opt = torch.optim.SGD(_param_groups(net, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    model = net
    if fabric is not None:  # DDP: gradients all-reduced in backward; the optimizer stays the plain one
        model = fabric.setup_module(net)
        m.ranks = FabricRanks(fabric)
    check_writable(out_dir)  # only now: bad input above leaves no directory behind
    hflip = dataset.channels == 3 if opts["hflip"] is None else bool(opts["hflip"])  # glyphs are not mirror-symmetric
    weak, strong = views_for(dataset.image_size, hflip=hflip)
    # pixels: uint8 [B, C, H, W] batches on the device (whole pool there when it fits); views per batch
    return _Parts(net=net, model=model, ema=ema, opt=opt, m=m, dev=dev, weak=weak, strong=strong,
                  rows=PoolReader(dataset.x_train, dev), mean=torch.tensor(dataset.mean, device=dev).view(1, -1, 1, 1),
                  std=torch.tensor(dataset.std, device=dev).view(1, -1, 1, 1), backbone=backbone)


def _resume(parts: _Parts, *, out_dir: Path, fingerprint: dict, steps: int, li: np.ndarray, rank: int) -> int:
    """Load `out_dir/state.pt` (every rank, weights_only) and return its step; a fresh run sets the method up
    (SimMatch's bank) and returns 0. Rank 0 drops metrics lines past the checkpoint."""
    state_path, metrics_path = out_dir / "state.pt", out_dir / "metrics.jsonl"
    net, ema, m = parts.net, parts.ema, parts.m
    if not state_path.exists():
        net.train()
        ema.train()
        m.setup(net, ema, parts.norm(parts.weak(parts.images(li))))
        return 0
    fix = "delete it to start this fine-tune over, or choose another output dir"
    st = load_checkpoint(state_path, functools.partial(_state_problem, steps=steps), fix)
    if st["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if st["fingerprint"].get(k) != fingerprint[k])
        raise UserError(f"{out_dir} holds a semi-supervised run with other arguments ({', '.join(diff)}); "
                        "rerun with the same arguments to resume, or choose another output dir")
    with fitting(state_path, "this model", fix):
        net.load_state_dict(st["model"])
        ema.model.load_state_dict(st["teacher"])
        parts.opt.load_state_dict(st["optimizer"])
        m.load_state_dict(st["method"])
    if rank == 0:
        truncate_metrics(metrics_path, st["step"])  # drop lines past the checkpoint: those steps are redone
    return st["step"]


def _state_problem(st, *, steps: int) -> str | None:
    """What is wrong with a loaded state.pt (kind, keys, types, step range), or None."""
    need = {"fingerprint": dict, "model": dict, "teacher": dict, "optimizer": dict, "method": dict, "step": int}
    problem = state_problem(st, kind="alssl-semi", what="an alssl semi-supervised checkpoint", need=need)
    if problem is None and not 0 <= st["step"] <= steps:
        return f"step {st['step']} is outside 0..{steps}"
    return problem


def _finite(loss: torch.Tensor, ranks: Ranks) -> bool:
    """The loss is finite on every rank (one all-reduce under DDP, so all ranks stop together)."""
    if ranks.world == 1:
        return bool(torch.isfinite(loss))
    return float(ranks.sum((~torch.isfinite(loss.detach())).float().reshape(1))) == 0.0


def _logged(loss: torch.Tensor, logs: dict, ranks: Ranks) -> dict:
    """This step's loss and the method's logs for metrics.jsonl: means over ranks under DDP."""
    vals = ranks.mean(torch.stack([loss.detach().float()]
                                  + [torch.as_tensor(v).detach().float() for v in logs.values()]))
    return {"loss": float(vals[0]), **{k: round(float(v), 6) for k, v in zip(logs, vals[1:])}}


def _train(parts: _Parts, *, dataset, li, ly, ui, start, steps, batch_size, mu, lr, lr_schedule, seed, precision,
           ckpt_every, eval_every, minutes, prefetch, quiet, method, fingerprint, out_dir, fabric, rank, world):
    """The loop, steps `start`..`steps`: returns (steps done, whether --minutes stopped it)."""
    from rich.progress import Progress

    from alssl.progress import Projection

    net, model, ema, opt, m, dev = parts.net, parts.model, parts.ema, parts.opt, parts.m, parts.dev
    state_path, metrics_path = out_dir / "state.pt", out_dir / "metrics.jsonl"
    y_l_all = torch.from_numpy(ly).to(dev)
    b_l, b_u = batch_size // world, mu * batch_size // world  # this rank's shard of the global batches
    m.to(dev)
    last_good = start if state_path.exists() else None

    def batch(k: int) -> Batch:  # step k's batch and views on this rank: a function of (seed, k, rank) only
        torch.manual_seed(((seed * 1_000_003 + k) * world + rank) % (2**63))  # augmentation RNG
        pl = stream_batch(len(li), batch_size, k, seed=seed, stream=0)[rank * b_l: (rank + 1) * b_l]  # [B/W] positions
        b = Batch(x_l=parts.norm(parts.weak(parts.images(li[pl]))), y_l=y_l_all[torch.from_numpy(pl).to(dev)],
                  i_l=torch.from_numpy(pl).to(dev))
        if m.uses_unlabeled:
            pu = stream_batch(len(ui), mu * batch_size, k, seed=seed, stream=1)[rank * b_u: (rank + 1) * b_u]
            xu = parts.images(ui[pu])
            b.x_uw, b.x_us = parts.norm(parts.weak(xu)), parts.norm(parts.strong(xu))
        return b

    # an hour's window for the ETA: rich's default (30 s) never sees two samples of a 26 s CPU step
    bar = Progress(disable=quiet or rank != 0 or not sys.stderr.isatty(), transient=True, speed_estimate_period=3600.0)
    task = bar.add_task(f"semi {method}", total=steps, completed=start)
    per_step = batch_size * (1 + (mu if m.uses_unlabeled else 0))
    projection = Projection(f"semi-finetune {method}", steps, start, per_step=per_step,
                            hint="; Ctrl-C and rerun the same command to resume") if rank == 0 else None
    net.train()
    ema.train()
    busy, n_busy = 0.0, 0  # seconds in steps (checkpoint writes included) since the last metrics line
    t0 = time.perf_counter()
    deadline = None if minutes is None else t0 + 60.0 * minutes  # --minutes: this call's wall-clock budget
    done, stopped = start, False
    with bar:
        # the next step's views are drawn on a worker thread while this step trains (alssl/prefetch.py)
        for step, b in ahead(batch, range(start, steps), enabled=prefetch, device=dev):
            for g in opt.param_groups:
                g["lr"] = lr_at(lr, step, steps, lr_schedule)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss, logs = m.loss(model, ema, b, step)  # bf16-mixed: forward and loss under autocast
            if not _finite(loss, m.ranks):
                raise non_finite_error("loss", f"at step {step}", None if last_good is None else state_path,
                                       what=non_finite_kind(loss), last_good=last_good)
            opt.zero_grad(set_to_none=True)
            if fabric is not None:
                fabric.backward(loss)  # DDP: the gradients are averaged over the ranks
            else:
                loss.backward()
            opt.step()
            if world > 1:
                _average_buffers(net, m.ranks)
            ema.update(net, step)  # from weights (and buffers) that are the same on every rank
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            busy, n_busy = busy + time.perf_counter() - t0, n_busy + 1
            done = step + 1
            if rank == 0 and eval_every and done % eval_every == 0 and dataset.has_test:
                res = evaluate(ema, x_test_u8(dataset), dataset.y_test, num_classes=dataset.num_classes,
                               mean=parts.mean, std=parts.std, device=dev)
                append_jsonl(metrics_path, {"step": done, "eval": True, "accuracy": res["accuracy"],
                                            "balanced_accuracy": res["balanced_accuracy"]})
            t0 = time.perf_counter()  # the next step's time starts here: checkpoint writes count, evaluations do not
            stopped = done < steps and past_deadline(deadline, t0, fabric)  # rank 0 decides
            if done % ckpt_every == 0 or done == steps or stopped:
                if not _all_finite(net):
                    raise non_finite_error("loss", f"at step {step}", None if last_good is None else state_path,
                                           what="NaN", last_good=last_good)
                line = {"step": done, **_logged(loss, logs, m.ranks), "lr": opt.param_groups[0]["lr"],
                        "steps_per_s": round(n_busy / busy, 4)}
                busy, n_busy = 0.0, 0
                if rank == 0:  # one writer; every rank holds the same weights
                    append_jsonl(metrics_path, line)
                    atomic_torch_save({"kind": "alssl-semi", "version": 1, "fingerprint": fingerprint, "step": done,
                                       "model": net.state_dict(), "teacher": ema.model.state_dict(),
                                       "optimizer": opt.state_dict(), "method": m.state_dict()}, state_path)
                last_good = done
            bar.update(task, completed=done, description=f"semi {method} loss {float(loss.detach()):.3f}")
            if projection is not None:
                projection.step(done)
            fault_after_steps(done)  # the run's step count: a resumed fine-tune is not killed again by the same k
            if stopped:  # checkpointed above: a rerun goes on from here, bit-identical to an unstopped run
                break
    return done, stopped


def _finish(parts: _Parts, *, dataset, method, steps, done, stopped, minutes, li, ui, backbone, teacher, record,
            out_dir, fabric, rank, world) -> dict | None:
    """The result on rank 0 (teacher's test accuracy, result.json unless stopped early); None on other ranks."""
    # under DDP: student (weights and BN buffers), teacher and method state (SimMatch's bank, DASO's queues, ...)
    in_sync = (ranks_in_sync(fabric, parts.net, dict(parts.net.named_buffers()), parts.ema.model.state_dict(),
                             parts.m.state_dict()) if world > 1 else None)
    if rank != 0:
        return None
    counts = {"n_labeled": int(len(li)), "n_unlabeled": int(len(ui)) if parts.m.uses_unlabeled else 0}
    ddp = {"devices": world, "ranks_in_sync": in_sync} if world > 1 else {}
    if stopped:
        print(f"# semi-finetune: the --minutes {minutes:g} budget is spent at step {done} of {steps}; the "
              f"checkpoint is kept: rerun the same command to go on", file=sys.stderr, flush=True)
        return {"method": method, "steps": steps, "stopped_at": done, "accuracy": None, "balanced_accuracy": None,
                "per_class_recall": None, **counts, **ddp}
    res = (evaluate(parts.ema, x_test_u8(dataset), dataset.y_test, num_classes=dataset.num_classes, mean=parts.mean,
                    std=parts.std, device=parts.dev)
           if dataset.has_test else {"accuracy": None, "balanced_accuracy": None, "per_class_recall": None})
    result = {"method": method, "steps": steps, "accuracy": res["accuracy"],
              "balanced_accuracy": res["balanced_accuracy"], "per_class_recall": res["per_class_recall"], **counts,
              **ddp}
    atomic_write_text(out_dir / "result.json", json.dumps({**(record or {}), **result, "backbone": backbone,
                                                           "teacher": teacher}, indent=1))
    return result


# ---------------------------------------------------------------- the entry point
def semi_finetune(dataset, *, labeled_idx: np.ndarray, labeled_y: np.ndarray, out_dir: Path,
                  method: str = "fixmatch", backbone: str = "cnn", init_checkpoint: Path | None = None,
                  init_weights: str | None = None,
                  steps: int = 1000, batch_size: int = 64, mu: int = 7, tau: float = 0.95, lambda_u: float = 1.0,
                  lr: float = 0.03, weight_decay: float = 5e-4, teacher: str = "ema", ema_decay: float = 0.999,
                  unlabeled_idx: np.ndarray | None = None, seed: int = 0, ckpt_every: int = 100,
                  eval_every: int = 0, quiet: bool = False, device: str = "auto", options: dict | None = None,
                  prefetch: bool = True, compile: bool = False, record: dict | None = None,
                  minutes: float | None = None,
                  precision: str = "32-true", devices: int = 1, num_nodes: int = 1) -> dict | None:
    """Semi-supervised fine-tuning of backbone + linear head on the labeled pool indices; see docs/semi.md.

    Returns {"method", "steps", "accuracy", "balanced_accuracy", "per_class_recall", "n_labeled", "n_unlabeled"}
    measured on the test split with the EMA/EMAN teacher. `init_checkpoint` (a stage-1 backbone.pt) overrides
    `backbone`; `init_weights` (a state dict file or "hub", see backbones.load_init_weights) starts `backbone` from
    the user's weights instead. `out_dir` receives state.pt (resumable), metrics.jsonl and result.json (plus the
    plain fields of `record`, e.g. which feature set the fine-tune started from). `minutes`: a wall-clock budget for
    this call; when spent, the loop checkpoints and returns `stopped_at` (no result.json: the fine-tune is unfinished,
    and a rerun goes on from the checkpoint). `devices` > 1: DDP over that many processes launched by Fabric (the
    command line is re-run for ranks 1..N-1, as `pretrain`); `batch_size` is the global batch, each rank draws its
    shard; rank 0 writes every file and returns the result, the other ranks return None (docs/scale.md).
    `num_nodes` > 1: the same call on every node (NODE_RANK, MASTER_ADDR, MASTER_PORT set), `devices` on each; the
    ranks and the global batch's shards are global (node-major), global rank 0 writes.
    """
    from alssl.semi import METHODS

    # ---- setup: validate everything before a process is launched or a file written
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if teacher not in TEACHERS:
        raise unknown("teacher", teacher, TEACHERS)
    _check_args(steps=steps, batch_size=batch_size, mu=mu, tau=tau, lambda_u=lambda_u, lr=lr,
                weight_decay=weight_decay, ema_decay=ema_decay, ckpt_every=ckpt_every, eval_every=eval_every, seed=seed)
    cls = METHODS[method]
    opts = _resolve_options(cls, steps, options)
    li, ly, ui = _index_sets(dataset, cls, opts, labeled_idx, labeled_y, unlabeled_idx, seed)
    if devices * num_nodes == 1:
        _device(device)  # a bad device name is refused before anything else
    out_dir = Path(out_dir)
    fingerprint = _fingerprint(method=method, backbone=backbone, init_checkpoint=init_checkpoint,
                               init_weights=init_weights, steps=steps, batch_size=batch_size, mu=mu, tau=tau,
                               lambda_u=lambda_u, lr=lr, weight_decay=weight_decay, teacher=teacher,
                               ema_decay=ema_decay, seed=seed, opts=opts, li=li, ly=ly, ui=ui)
    fabric, dev, rank, world = _launch(device, devices, precision, batch_size, num_nodes)

    cuda_ids = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)  # the same initial weights, views of the bank, ... on every rank
        parts = _build(dataset, cls, opts, ly, dev=dev, fabric=fabric, backbone=backbone,
                       init_checkpoint=init_checkpoint, init_weights=init_weights, steps=steps, tau=tau,
                       lambda_u=lambda_u, lr=lr, weight_decay=weight_decay, teacher=teacher, ema_decay=ema_decay,
                       compile=compile, out_dir=out_dir)
        # ---- resume: every rank loads the same checkpoint
        start = _resume(parts, out_dir=out_dir, fingerprint=fingerprint, steps=steps, li=li, rank=rank)
        # ---- the loop
        done, stopped = _train(parts, dataset=dataset, li=li, ly=ly, ui=ui, start=start, steps=steps,
                               batch_size=batch_size, mu=mu, lr=lr, lr_schedule=opts["lr_schedule"], seed=seed,
                               precision=precision, ckpt_every=ckpt_every, eval_every=eval_every, minutes=minutes,
                               prefetch=prefetch, quiet=quiet, method=method, fingerprint=fingerprint,
                               out_dir=out_dir, fabric=fabric, rank=rank, world=world)
        # ---- finish: rank 0 evaluates the teacher and writes result.json
        return _finish(parts, dataset=dataset, method=method, steps=steps, done=done, stopped=stopped,
                       minutes=minutes, li=li, ui=ui, backbone=parts.backbone, teacher=teacher, record=record,
                       out_dir=out_dir, fabric=fabric, rank=rank, world=world)


def x_test_u8(dataset) -> torch.Tensor:
    return torch.from_numpy(dataset.x_test).permute(0, 3, 1, 2)
