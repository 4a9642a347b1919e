"""The stage-4 loop: one visible training loop shared by every method, resumable, with atomic checkpoints.

Per step k (of K): draw the labeled batch (B) and unlabeled batch (μB) — deterministic functions of (seed, k) —
make the weak / strong views on the device (on a worker thread, one step ahead: alssl/prefetch.py), ask the method
for its loss, check it is finite, backward, SGD step (nesterov, momentum 0.9, lr·cos(7πk/(16K)) — constant for DASO,
as its official code — no weight decay on biases and norm parameters, as FixMatch), EMA/EMAN teacher update. Every `ckpt_every` steps `state.pt` (model, teacher, optimizer, method state, step) is written
atomically; a rerun with the same arguments resumes from it and ends with the same weights as an uninterrupted run,
because the torch RNG is re-seeded from (seed, k) at the start of every step (no RNG stream to carry across a kill).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl.backbones import build_backbone, load_backbone_checkpoint, load_init_weights
from alssl.data import PoolReader
from alssl.errors import UserError, check_positive, check_seed, unknown
from alssl.prefetch import ahead
from alssl.runs import (append_jsonl, atomic_torch_save, atomic_write_text, check_writable, read_jsonl, torch_load,
                        write_jsonl)
from alssl.semi.common import Batch, Method, Net
from alssl.semi.teacher import TEACHERS, Teacher
from alssl.semi.views import views_for

COMMON_OPTIONS = {"unlabeled_profile": "same", "unlabeled_imbalance": None, "hflip": None,  # hflip None: colour only
                  "lr_schedule": "cosine"}  # a method's defaults() may override (DASO: constant, as its official code)
OPTION_TYPES = {"unlabeled_imbalance": float, "hflip": bool}  # options whose default (None) does not show their type
LR_SCHEDULES = ("cosine", "constant")
FAULT_ENV = "ALSSL_FAULT_AFTER_STEPS"  # test hook: SIGKILL this process right after optimizer step k (global count)


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
                  precision: str = "32-true") -> dict:
    """Semi-supervised fine-tuning of backbone + linear head on the labeled pool indices; see docs/semi.md.

    Returns {"method", "steps", "accuracy", "balanced_accuracy", "per_class_recall", "n_labeled", "n_unlabeled"}
    measured on the test split with the EMA/EMAN teacher. `init_checkpoint` (a stage-1 backbone.pt) overrides
    `backbone`; `init_weights` (a state dict file or "hub", see backbones.load_init_weights) starts `backbone` from
    the user's weights instead. `out_dir` receives state.pt (resumable), metrics.jsonl and result.json (plus the
    plain fields of `record`, e.g. which feature set the fine-tune started from). `minutes`: a wall-clock budget for
    this call; when spent, the loop checkpoints and returns `stopped_at` (no result.json: the fine-tune is unfinished,
    and a rerun goes on from the checkpoint).
    """
    from alssl.semi import METHODS

    if method not in METHODS:
        raise unknown("method", method, METHODS)
    if teacher not in TEACHERS:
        raise unknown("teacher", teacher, TEACHERS)
    _check_args(steps=steps, batch_size=batch_size, mu=mu, tau=tau, lambda_u=lambda_u, lr=lr,
                weight_decay=weight_decay, ema_decay=ema_decay, ckpt_every=ckpt_every, eval_every=eval_every, seed=seed)
    cls = METHODS[method]
    opts = _resolve_options(cls, steps, options)
    K = dataset.num_classes
    li, ly, ui = _check_indices(dataset.n_pool, K, labeled_idx, labeled_y, unlabeled_idx)
    if len(ui) and (opts["unlabeled_profile"] != "same" or opts["unlabeled_imbalance"] is not None):
        if not dataset.has_ground_truth:
            raise UserError("unlabeled_profile / unlabeled_imbalance reshape the pool with its ground truth (a "
                            "simulation); an unlabeled image folder has none, so leave them out")
        ui = shape_unlabeled(ui, dataset.y_train[ui], num_classes=K, profile=opts["unlabeled_profile"],
                             gamma=opts["unlabeled_imbalance"], seed=seed)
    if cls.uses_unlabeled and len(ui) == 0:
        raise UserError(f"method {method} needs unlabeled samples but the pool has none left; use --method supervised")
    dev = _device(device)
    if precision not in PRECISIONS:
        raise unknown("precision", precision, PRECISIONS)
    out_dir = Path(out_dir)
    state_path, metrics_path = out_dir / "state.pt", out_dir / "metrics.jsonl"

    init_sha = None
    if init_checkpoint is not None:
        init_sha = hashlib.sha256(Path(init_checkpoint).read_bytes()).hexdigest()[:16] if Path(init_checkpoint).exists() else None
    if init_weights is not None and init_weights != "hub":
        p = Path(init_weights).expanduser()
        init_sha = "weights:" + (hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else str(p))
    elif init_weights == "hub":
        init_sha = "hub"
    fingerprint = {"method": method, "backbone": backbone if init_checkpoint is None else None, "init": init_sha,
                   "steps": steps, "batch_size": batch_size, "mu": mu, "tau": tau, "lambda_u": lambda_u, "lr": lr,
                   "weight_decay": weight_decay, "teacher": teacher, "ema_decay": ema_decay, "seed": seed,
                   "options": json.dumps(opts, sort_keys=True, default=str), "labeled": array_digest(li, ly), "unlabeled": array_digest(ui)}

    cuda_ids = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)
        # ---- model, teacher, optimizer, method
        if init_checkpoint is not None:
            bb, ck = load_backbone_checkpoint(init_checkpoint, expect_channels=dataset.channels)
            backbone = ck["backbone"]
        else:
            bb = build_backbone(backbone, dataset.channels)
            if init_weights is not None:
                load_init_weights(bb, backbone, init_weights)
        m = cls(num_classes=K, labeled_y=torch.from_numpy(ly), steps=steps, tau=tau, lambda_u=lambda_u, options=opts)
        net = Net(bb, K, proj_dim=m.proj_dim).to(dev)
        if dev.type == "cpu":  # oneDNN's fast conv layout: ~1.2x per WRN-28-2 step on this CPU (inputs follow)
            net = net.to(memory_format=torch.channels_last)
        ema = Teacher(net, kind=teacher, decay=ema_decay)
        if compile:
            net.backbone.compile()  # in place (state dict keys unchanged); the teacher stays eager
        opt = torch.optim.SGD(_param_groups(net, weight_decay), lr=lr, momentum=0.9, nesterov=True)
        check_writable(out_dir)  # only now: bad input above leaves no directory behind
        hflip = dataset.channels == 3 if opts["hflip"] is None else bool(opts["hflip"])  # glyphs are not mirror-symmetric
        weak, strong = views_for(dataset.image_size, hflip=hflip)
        # ---- pixels: uint8 [B, C, H, W] batches on the device (whole pool there when it fits); views per batch
        rows = PoolReader(dataset.x_train, dev)
        mean = torch.tensor(dataset.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, device=dev).view(1, -1, 1, 1)

        def norm(x: torch.Tensor) -> torch.Tensor:  # [b, C, H, W] in [0, 1] -> normalised
            return (x - mean) / std

        def images(idx: np.ndarray) -> torch.Tensor:
            return rows(idx).float() / 255.0

        y_l_all = torch.from_numpy(ly).to(dev)
        start = 0
        if state_path.exists():
            st = torch_load(state_path)
            if not isinstance(st, dict) or st.get("kind") != "alssl-semi":
                raise UserError(f"{state_path} is not an alssl semi-supervised checkpoint; delete it or choose another output dir")
            bad = next((k for k in ("fingerprint", "model", "teacher", "optimizer", "method") if not isinstance(st.get(k), dict)), None)
            if bad or type(st.get("step")) is not int or not 0 <= st["step"] <= steps:
                raise UserError(f"{state_path} is damaged ({bad or 'step'} is missing or mistyped); delete it to start "
                                "this fine-tune over, or choose another output dir")
            if st["fingerprint"] != fingerprint:
                diff = sorted(k for k in fingerprint if st["fingerprint"].get(k) != fingerprint[k])
                raise UserError(f"{out_dir} holds a semi-supervised run with other arguments ({', '.join(diff)}); "
                                "rerun with the same arguments to resume, or choose another output dir")
            try:
                net.load_state_dict(st["model"])
                ema.model.load_state_dict(st["teacher"])
                opt.load_state_dict(st["optimizer"])
                m.load_state_dict(st["method"])
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{state_path} does not fit this model ({str(exc).strip().splitlines()[0][:120]}); delete "
                                "it to start this fine-tune over, or choose another output dir") from None
            start = st["step"]
            kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= start]  # drop lines past the checkpoint
            write_jsonl(metrics_path, kept)
        else:
            net.train()
            ema.train()
            m.setup(net, ema, norm(weak(images(li))))
        m.to(dev)
        last_good = start if state_path.exists() else None
        fault_at = int(os.environ.get(FAULT_ENV, "0") or 0)

        from rich.progress import Progress

        from alssl.progress import Projection

        # an hour's window for the ETA: rich's default (30 s) never sees two samples of a 26 s CPU step
        with Progress(disable=quiet or not sys.stderr.isatty(), transient=True, speed_estimate_period=3600.0) as bar:
            task = bar.add_task(f"semi {method}", total=steps, completed=start)
            projection = Projection(f"semi-finetune {method}", steps, start,
                                    per_step=batch_size * (1 + (mu if m.uses_unlabeled else 0)),
                                    hint="; Ctrl-C and rerun the same command to resume")
            net.train()
            ema.train()
            busy, n_busy = 0.0, 0  # seconds in steps (checkpoint writes included) since the last metrics line

            def batch(k: int) -> Batch:  # step k's batch and views: a function of (seed, k) only
                torch.manual_seed((seed * 1_000_003 + k) % (2**63))  # augmentation RNG
                pl = stream_batch(len(li), batch_size, k, seed=seed, stream=0)  # [B] positions in the labeled set
                b = Batch(x_l=norm(weak(images(li[pl]))), y_l=y_l_all[torch.from_numpy(pl).to(dev)],
                          i_l=torch.from_numpy(pl).to(dev))
                if m.uses_unlabeled:
                    xu = images(ui[stream_batch(len(ui), mu * batch_size, k, seed=seed, stream=1)])
                    b.x_uw, b.x_us = norm(weak(xu)), norm(strong(xu))
                return b

            t0 = time.perf_counter()
            deadline = None if minutes is None else t0 + 60.0 * minutes  # --minutes: this call's wall-clock budget
            stopped = False
            # the next step's views are drawn on a worker thread while this step trains (alssl/prefetch.py)
            for step, b in ahead(batch, range(start, steps), enabled=prefetch, device=dev):
                for g in opt.param_groups:
                    g["lr"] = lr_at(lr, step, steps, opts["lr_schedule"])
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                    loss, logs = m.loss(net, ema, b, step)  # bf16-mixed: forward and loss under autocast
                if not torch.isfinite(loss):
                    _raise_nan(loss, step, last_good, state_path)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update(net, step)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                busy, n_busy = busy + time.perf_counter() - t0, n_busy + 1
                done = step + 1
                if eval_every and done % eval_every == 0 and dataset.has_test:
                    res = evaluate(ema, x_test_u8(dataset), dataset.y_test, num_classes=K, mean=mean, std=std, device=dev)
                    append_jsonl(metrics_path, {"step": done, "eval": True, "accuracy": res["accuracy"],
                                                "balanced_accuracy": res["balanced_accuracy"]})
                t0 = time.perf_counter()  # the next step's time starts here: checkpoint writes count, evaluations do not
                stopped = deadline is not None and done < steps and t0 > deadline
                if done % ckpt_every == 0 or done == steps or stopped:
                    if not _all_finite(net):
                        _raise_nan(torch.tensor(float("nan")), step, last_good, state_path)
                    append_jsonl(metrics_path, {"step": done, "loss": float(loss.detach()),
                                                **{k: round(float(v), 6) for k, v in logs.items()},
                                                "lr": opt.param_groups[0]["lr"], "steps_per_s": round(n_busy / busy, 4)})
                    busy, n_busy = 0.0, 0
                    atomic_torch_save({"kind": "alssl-semi", "version": 1, "fingerprint": fingerprint, "step": done,
                                       "model": net.state_dict(), "teacher": ema.model.state_dict(),
                                       "optimizer": opt.state_dict(), "method": m.state_dict()}, state_path)
                    last_good = done
                bar.update(task, completed=done, description=f"semi {method} loss {float(loss.detach()):.3f}")
                projection.step(done)
                if fault_at and done == fault_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stopped:  # checkpointed above: a rerun goes on from here, bit-identical to an unstopped run
                    break
        if stopped:
            print(f"# semi-finetune: the --minutes {minutes:g} budget is spent at step {done} of {steps}; the "
                  f"checkpoint is kept: rerun the same command to go on", file=sys.stderr, flush=True)
            return {"method": method, "steps": steps, "stopped_at": done, "accuracy": None, "balanced_accuracy": None,
                    "per_class_recall": None, "n_labeled": int(len(li)),
                    "n_unlabeled": int(len(ui)) if m.uses_unlabeled else 0}

        res = (evaluate(ema, x_test_u8(dataset), dataset.y_test, num_classes=K, mean=mean, std=std, device=dev)
               if dataset.has_test else {"accuracy": None, "balanced_accuracy": None, "per_class_recall": None})
    result = {"method": method, "steps": steps, "accuracy": res["accuracy"],
              "balanced_accuracy": res["balanced_accuracy"], "per_class_recall": res["per_class_recall"],
              "n_labeled": int(len(li)), "n_unlabeled": int(len(ui)) if m.uses_unlabeled else 0}
    atomic_write_text(out_dir / "result.json", json.dumps({**(record or {}), **result, "backbone": backbone,
                                                           "teacher": teacher}, indent=1))
    return result


def x_test_u8(dataset) -> torch.Tensor:
    return torch.from_numpy(dataset.x_test).permute(0, 3, 1, 2)


def _raise_nan(loss: torch.Tensor, step: int, last_good: int | None, state_path: Path) -> None:
    what = "NaN" if torch.isnan(loss).any() else "inf"
    kept = (f"the last good checkpoint (step {last_good}) is kept in {state_path}" if last_good is not None
            else "no checkpoint was written yet")
    raise UserError(f"loss became {what} at step {step}; {kept}; lower --lr")
