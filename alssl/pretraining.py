"""Stage 1: self-supervised pretraining (SimSiam, MoCo v2, BYOL; EMAN teacher option) in one visible loop.

Built from lightly's heads, losses and momentum utilities; Lightning Fabric supplies devices, precision and DDP.

- SimSiam (Chen & He 2021, arXiv 2011.10566): projection + prediction heads, symmetric negative cosine similarity
  with stop-gradient on the target branch; SGD lr 0.05·bs/256, wd 5e-4 (lightly's CIFAR recipe).
- MoCo v2 (Chen et al. 2020, arXiv 2003.04297): key encoder = momentum copy (m = 0.99, optional cosine schedule to 1),
  a queue of keys (default min(4096, N/2)) and InfoNCE with T = 0.2 (lightly's NTXentLoss with a memory bank).
- BYOL (Grill et al. 2020, arXiv 2006.07733): online network with predictor, target = momentum copy with m
  cosine-scheduled 0.99 → 1, symmetric loss.
- EMAN (Cai et al. 2021, arXiv 2103.16436), `eman=True` for MoCo / BYOL: the teacher is the EMA of the student's
  whole state, BatchNorm running statistics included, and always runs in eval mode.

Pixels come through `alssl.data.PoolReader`: a pool that fits (the array SPECs) lives on the training device as one
uint8 tensor, an on-disk pool (an image folder) is read batch by batch; every step takes a batch and draws two kornia
views on it (on a worker thread while the previous step trains: alssl/prefetch.py), so there is no per-image PIL
pipeline and no DataLoader. The random stream of step t on rank r is seeded from
(seed, t, r), which makes a resumed run bit-identical to an uninterrupted one. Checkpoints (`pretrain-state.pt`:
model, teacher, queue, optimizer, scheduler, step) are written atomically every epoch and every `ckpt_every_steps`.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import sys
import time
import warnings
import zlib
from contextlib import nullcontext
from pathlib import Path

import faiss
import numpy as np
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules.heads import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
)
from lightly.models.utils import update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from alssl.augment import SSLView, normalise
from alssl.backbones import backbone_checkpoint, build_backbone, load_init_weights
from alssl.data import Dataset, PoolReader
from alssl.errors import UserError, check_positive, check_seed, warn
from alssl.feature_sets import rankme
from alssl.prefetch import ahead
from alssl.progress import Projection, progress_bar
from alssl.runs import Run, atomic_torch_save, read_jsonl, torch_load, write_jsonl

METHODS = ("simsiam", "moco", "byol")
BASE_LR = {"simsiam": 0.05, "moco": 0.06, "byol": 0.06}  # per 256 images (lightly's CIFAR-10 benchmark recipes)
STATE_FILE = "pretrain-state.pt"


# ---------------------------------------------------------------- models
class Encoder(nn.Module):
    """backbone → projection head; the part a momentum teacher copies."""

    def __init__(self, backbone: nn.Module, projection: nn.Module):
        super().__init__()
        self.backbone, self.projection = backbone, projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, P]
        return self.projection(self.backbone(x))


class SSLNet(nn.Module):
    """The student: encoder (+ predictor for SimSiam / BYOL). forward -> (z projection, p prediction or z)."""

    def __init__(self, method: str, backbone: nn.Module):
        super().__init__()
        d = backbone.dim
        if method == "simsiam":  # lightly's CIFAR benchmark sizes, input scaled to the backbone
            proj, self.prediction = SimSiamProjectionHead(d, 512, 128), SimSiamPredictionHead(128, 64, 128)
        elif method == "moco":
            proj, self.prediction = MoCoProjectionHead(d, 512, 128), None
        else:
            proj, self.prediction = BYOLProjectionHead(d, 1024, 256), BYOLPredictionHead(256, 1024, 256)
        self.encoder = Encoder(backbone, proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, (self.prediction(z) if self.prediction is not None else z)


@torch.no_grad()
def momentum_update(student: nn.Module, teacher: nn.Module, m: float, *, eman: bool) -> None:
    """θ_t ← m·θ_t + (1−m)·θ_s (lightly's update_momentum); with EMAN also the BN running statistics.

    EMAN averages every floating-point buffer (running mean / var) and copies integer counters; the plain momentum
    encoder keeps its own buffers, as in MoCo's and lightly's code.
    """
    update_momentum(student, teacher, m)
    if eman:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            if tb.is_floating_point():
                tb.mul_(m).add_(sb, alpha=1.0 - m)
            else:
                tb.copy_(sb)


# ---------------------------------------------------------------- kNN monitor
@torch.no_grad()
def knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, *,
                 num_classes: int, k: int = 200, t: float = 0.1) -> float:
    """Weighted kNN accuracy (Wu et al. 2018, as in lightly's benchmarks): cosine top-k with faiss, votes exp(s/T)."""
    train = np.ascontiguousarray(train, dtype=np.float32)
    test = np.ascontiguousarray(test, dtype=np.float32)
    faiss.normalize_L2(train)
    faiss.normalize_L2(test)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    k = min(k, len(train))
    sim, nn_idx = index.search(test, k)  # [M, k]
    weights = torch.from_numpy(sim).div_(t).exp_()  # [M, k]
    votes = torch.zeros(len(test), num_classes)
    votes.scatter_add_(1, torch.from_numpy(train_y[nn_idx]).long(), weights)
    return float((votes.argmax(1).numpy() == test_y).mean())


def knn_cv_accuracy(x: np.ndarray, y: np.ndarray, *, num_classes: int, k: int = 20, t: float = 0.1,
                    folds: int = 5) -> float | None:
    """Weighted kNN accuracy by stratified k-fold *within* one labeled set (an image folder's `--test`, whose pool has
    no labels): each fold is voted on by the other folds. None when a class has fewer than 2 images."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=num_classes)
    n_splits = int(min(folds, counts[counts > 0].min())) if len(y) else 0
    if n_splits < 2 or np.count_nonzero(counts) < 2:
        return None
    correct = 0
    for tr, te in StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0).split(x, y):
        correct += round(knn_accuracy(x[tr], y[tr], x[te], y[te], num_classes=num_classes, k=min(k, len(tr)), t=t)
                         * len(te))
    return correct / len(y)


@torch.no_grad()
def _embed(backbone: nn.Module, rows: PoolReader, mean, std, batch_size: int = 1024) -> np.ndarray:
    was_training = backbone.training
    backbone.eval()
    out = [backbone(normalise(rows(np.arange(i, min(i + batch_size, len(rows)))).float().div_(255), mean, std)).float().cpu()
           for i in range(0, len(rows), batch_size)]
    backbone.train(was_training)
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- helpers
@torch.no_grad()
def _calibrate_bn(encoder: nn.Module, rows: PoolReader, view: nn.Module, bs: int, batches: int = 10) -> None:
    """Set the BN running statistics of a fresh encoder to the true averages over a few augmented batches.

    EMAN's teacher normalises with running statistics from step 0. Starting from the default (0, 1) buffers, its
    EMA (m = 0.99) needs hundreds of steps to reach the real statistics, which a short CPU schedule never has
    (measured on digits, MoCo-EMAN 330 steps: the student collapsed). Precise-BN initialisation (Wu & Johnson 2021,
    arXiv 2105.07576) fixes the start and leaves the method unchanged.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum, m._saved_momentum = None, m.momentum  # None = cumulative moving average
    encoder.train()
    g = torch.Generator().manual_seed(1234)
    for _ in range(batches):
        encoder(view(rows(torch.randint(len(rows), (bs,), generator=g)).cpu().float().div_(255)))
    for m in bns:
        m.momentum = m._saved_momentum
        del m._saved_momentum


KNN_POOL = "kNN: labeled pool votes for the test set"
KNN_TEST_CV = "kNN: 5-fold within the labeled test set"
RANKME_ONLY = "RankMe only (no labeled images)"


def score_source(dataset: Dataset) -> str:
    """How pretraining scores features on this data (docs/pretrain.md "Is stage 1 helping?")."""
    if dataset.has_ground_truth and dataset.has_test:
        return KNN_POOL
    if dataset.has_test:
        return KNN_TEST_CV
    return RANKME_ONLY


def _step_seed(seed: int, step: int, rank: int) -> int:
    return zlib.crc32(f"{seed}/{step}/{rank}".encode())


def _fabric(accelerator: str, devices, strategy: str, precision: str):
    from lightning_fabric import Fabric

    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
    except Exception as exc:  # Fabric reports bad device/precision combinations as ValueError / RuntimeError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot set up --accelerator {accelerator} --devices {devices} --precision {precision} "
                        f"--strategy {strategy}: {msg}") from None
    return fabric


def check_args(*, method: str, eman: bool, momentum: float, momentum_schedule: str | None, accelerator: str,
               devices, strategy: str, precision: str, seed: int = 0, lr: float | None = None,
               temperature: float = 0.2):
    """Validate the stage-1 arguments (before anything is written); returns the configured (unlaunched) Fabric."""
    check_seed(seed)
    if lr is not None:
        check_positive(lr, "--lr")
    check_positive(temperature, "--temperature")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if eman and method == "simsiam":
        raise UserError("--eman needs a momentum teacher; use it with --method moco or --method byol")
    if momentum_schedule not in (None, "cosine"):
        raise UserError(f"unknown momentum schedule {momentum_schedule!r}; use cosine or leave it out")
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"--momentum must be in [0, 1), got {momentum}")
    return _fabric(accelerator, devices, strategy, precision)


def _saved_problem(saved, method: str) -> str | None:
    """What is wrong with a loaded pretrain-state.pt (kind, keys, types), or None."""
    if not isinstance(saved, dict) or saved.get("kind") != "alssl-pretrain-state":
        return "not an alssl pretraining state"
    need = {"method": str, "total": int, "step": int, "model": dict, "optimizer": dict, "scheduler": dict,
            "teacher": dict, "history": list}
    if method == "moco" and saved.get("method") == "moco":
        need |= {"queue": torch.Tensor, "queue_ptr": torch.Tensor}
    for key, kind in need.items():
        if key not in saved:
            return f"key {key!r} is missing"
        if not isinstance(saved[key], kind) or (kind is int and isinstance(saved[key], bool)):
            return f"{key} is a {type(saved[key]).__name__}, not a {kind.__name__}"
    if not 0 <= saved["step"] <= saved["total"]:
        return f"step {saved['step']} is outside 0..{saved['total']}"
    if not all(isinstance(h, dict) for h in saved["history"]):
        return "history holds a non-dict entry"
    sums = saved.get("epoch_sums")
    if sums is not None and not (isinstance(sums, dict) and isinstance(sums.get("loss"), torch.Tensor)
                                 and isinstance(sums.get("std"), float) and type(sums.get("n")) is int):
        return "epoch_sums is malformed"
    return None


def _fault_after_steps(done_here: int) -> None:
    """Fault injection for the kill -9 tests: ALSSL_FAULT_AFTER_STEPS=k kills this process after k steps."""
    k = os.environ.get("ALSSL_FAULT_AFTER_STEPS")
    if k is not None and done_here >= int(k):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the loop
def pretrain(
    dataset: Dataset,
    run: Run,
    *,
    method: str = "simsiam",
    backbone: str = "cnn",
    epochs: int = 20,
    batch_size: int = 256,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    eman: bool = False,
    momentum: float = 0.99,
    momentum_schedule: str | None = None,
    queue_size: int | None = None,
    temperature: float = 0.2,
    devices: int | str = 1,
    accelerator: str = "auto",
    precision: str = "32-true",
    strategy: str = "auto",
    seed: int = 0,
    ckpt_every_steps: int = 0,
    knn_k: int = 200,
    knn_t: float = 0.1,
    knn_every: int = 1,
    hflip: bool | None = None,
    init: str | None = None,
    prefetch: bool = True,
    compile: bool = False,
    minutes: float | None = None,
    quiet: bool = True,
) -> dict | None:
    """Pretrain `backbone` on the run's pool; resume from `RUN/checkpoints/pretrain-state.pt` when it exists.

    Writes `RUN/checkpoints/backbone.pt` (the student backbone) at the end and returns a summary dict on rank 0
    (None on other ranks). `epochs=0` writes the seeded random-init backbone: the baseline every curve needs;
    `init` (a state dict file or "hub") starts the backbone from those weights (`--epochs 0 --init PATH`: the frozen
    pretrained-features baseline). `prefetch` draws the next step's views on a worker thread (alssl/prefetch.py);
    `compile` runs the student's forward and backward through torch.compile (see docs/pretrain.md for when it pays).
    `minutes`: a wall-clock budget for this call's training steps; when it is spent the loop stops after the step in
    hand, checkpoints (resumable) and writes `backbone.pt` from the weights so far; the summary says `stopped_at`.
    """
    fabric = check_args(method=method, eman=eman, momentum=momentum, momentum_schedule=momentum_schedule,
                        accelerator=accelerator, devices=devices, strategy=strategy, precision=precision, seed=seed,
                        lr=lr, temperature=temperature)
    if method == "byol":
        momentum_schedule = momentum_schedule or "cosine"  # BYOL: τ from 0.99 to 1 with a cosine schedule
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    ckpt_dir = run.checkpoints
    state_path = ckpt_dir / STATE_FILE

    n_pool = dataset.n_pool
    data_key = [n_pool, dataset.channels, dataset.image_size]  # what a checkpoint must have been trained on
    if run.state.get("n_pool", n_pool) != n_pool:
        raise UserError(f"{run.path} was made from a pool of {run.state['n_pool']} images but this data has {n_pool}; "
                        "resume with the original data (see run.toml) or pick a new --out")
    per_rank = n_pool // world
    bs = min(batch_size, per_rank)
    if bs < 2:
        raise UserError(f"the pool has {n_pool} images: too few for {world} device(s); use more data or fewer --devices")
    steps_per_epoch = per_rank // bs
    total = epochs * steps_per_epoch
    base_lr = (lr if lr is not None else BASE_LR[method] * bs * world / 256)

    torch.manual_seed(seed)  # same initial weights (and MoCo queue) on every rank
    net = SSLNet(method, build_backbone(backbone, dataset.channels))
    if init is not None:  # after SSLNet: the heads draw the same random numbers with or without --init
        load_init_weights(net.encoder.backbone, backbone, init)
    rows = PoolReader(dataset.x_train, fabric.device)  # uint8 [B, C, H, W] batches on the device
    view = SSLView(dataset.image_size, dataset.channels, dataset.mean, dataset.std, hflip=hflip)
    if eman and not state_path.exists():
        _calibrate_bn(net.encoder, rows, view, bs)
    if rank == 0 and total > 0 and not state_path.exists():  # the start, kept as a feature set of its own
        atomic_torch_save(backbone_checkpoint(net.encoder.backbone, name=backbone, in_channels=dataset.channels,
                                              init=init, epochs=0, seed=seed), ckpt_dir / "start.pt")
    teacher = copy.deepcopy(net.encoder).requires_grad_(False) if method in ("moco", "byol") else None
    if method == "moco":
        q = queue_size if queue_size is not None else min(4096, n_pool // 2)
        criterion: nn.Module = NTXentLoss(temperature=temperature, memory_bank_size=(q, 128))
    else:
        criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))

    net = net.to(memory_format=torch.channels_last)  # NHWC convolutions: 1.48x faster per step on this CPU
    if compile:
        net.compile()  # in place: the state dict keeps its keys; the kNN monitor's backbone calls stay eager
    net_d, optimizer = fabric.setup(net, optimizer)
    criterion = criterion.to(fabric.device)
    if teacher is not None:
        teacher = teacher.to(fabric.device, memory_format=torch.channels_last)

    step, history, carry = 0, [], None  # carry: the partial-epoch loss sums of a mid-epoch checkpoint
    if state_path.exists():
        saved = torch_load(state_path)
        problem = _saved_problem(saved, method)
        if problem:
            raise UserError(f"{state_path} is damaged ({problem}); delete it to pretrain from scratch, or pick a new --out")
        if saved["method"] != method or saved["total"] != total:
            raise UserError(f"{state_path} belongs to another pretraining setup; rerun with the arguments in "
                            f"{run.path / 'run.toml'} or pick a new --out")
        if saved.get("data", data_key) != data_key:
            raise UserError(f"{state_path} was trained on other data (pool, channels, size {saved['data']}, not {data_key}); "
                            "resume with the original data (see run.toml) or pick a new --out")
        try:
            net.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if teacher is not None:
                teacher.load_state_dict(saved["teacher"])
            if method == "moco":
                criterion.memory_bank.bank.copy_(saved["queue"])
                criterion.memory_bank.bank_ptr.copy_(saved["queue_ptr"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{state_path} does not fit this model and data ({str(exc).strip().splitlines()[0][:120]}); "
                            "resume with the original data and arguments (see run.toml) or pick a new --out") from None
        step, history, carry = saved["step"], list(saved["history"]), saved.get("epoch_sums")
    if rank == 0:  # steps after the checkpoint are redone: forget what they logged, so no epoch line is doubled
        start, records = (step if history else -1), read_jsonl(run.metrics_file)
        kept = [r for r in records if r.get("stage") != "pretrain" or (type(r.get("step")) is int and r["step"] <= start)]
        if len(kept) != len(records):
            write_jsonl(run.metrics_file, kept)
    loss_sum, std_sum, n_steps = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device), 0

    def save() -> None:
        if rank != 0:
            return
        state = {"kind": "alssl-pretrain-state", "method": method, "total": total, "step": step, "data": data_key,
                 "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "teacher": teacher.state_dict() if teacher is not None else {}, "history": history,
                 "epoch_sums": {"loss": loss_sum.detach().cpu(), "std": float(std_sum), "n": n_steps}}
        if method == "moco":
            state["queue"] = criterion.memory_bank.bank.detach().cpu()
            state["queue_ptr"] = criterion.memory_bank.bank_ptr.detach().cpu()
        atomic_torch_save(state, state_path)

    view = view.to(fabric.device)
    knn_on = score_source(dataset) if knn_every > 0 else None
    test_rows = PoolReader(dataset.x_test, fabric.device) if knn_on not in (None, RANKME_ONLY) else None
    few_rows = None  # a pool without labels is embedded only on 1,024 evenly spaced images, for RankMe
    if knn_on not in (None, KNN_POOL):
        few_rows = PoolReader(dataset.x_train[np.linspace(0, n_pool - 1, min(n_pool, 1024)).astype(np.int64)],
                              fabric.device)

    def monitor(epoch: int, loss: float | None, collapse: float | None) -> dict:
        acc = rank_me = None
        if knn_on is not None and (epoch % knn_every == 0 or step == total):
            bb = net.encoder.backbone
            pool = _embed(bb, rows if knn_on == KNN_POOL else few_rows, dataset.mean, dataset.std)
            rank_me = round(rankme(pool), 2)
            if knn_on == KNN_POOL:  # a labeled benchmark: the pool votes for the test images
                acc = knn_accuracy(pool, dataset.y_train, _embed(bb, test_rows, dataset.mean, dataset.std),
                                   dataset.y_test, num_classes=dataset.num_classes, k=knn_k, t=knn_t)
            elif knn_on == KNN_TEST_CV:  # an image folder with --test: folds of the test set vote for each other
                acc = knn_cv_accuracy(_embed(bb, test_rows, dataset.mean, dataset.std), dataset.y_test,
                                      num_classes=dataset.num_classes, k=min(knn_k, 20), t=knn_t)
            acc = None if acc is None else round(acc, 4)
        rec = {"stage": "pretrain", "epoch": epoch, "step": step, "loss": loss, "knn_accuracy": acc, "rankme": rank_me,
               "collapse_std": collapse, "lr": optimizer.param_groups[0]["lr"]}
        if collapse is not None and collapse < 0.1 / math.sqrt(256 if method == "byol" else 128):  # 1/√d healthy
            warnings.warn(f"epoch {epoch}: representation collapse (std of l2-normalised outputs {collapse:.4f})")
        return rec

    if rank == 0 and not history:
        history.append(monitor(0, None, None))
        run.log_metrics(history[-1])

    progress, task = progress_bar(f"{method} {backbone}", total, step, quiet=quiet or rank != 0,
                                  fields={"loss": "-", "kNN": "-"})
    projection = Projection(f"pretrain {method} {backbone}", total, step, per_step=bs * world,
                            hint="; Ctrl-C and rerun the same command to resume") if rank == 0 else None
    t0, done_here = time.perf_counter(), 0
    deadline = None if minutes is None else t0 + 60.0 * minutes
    stopped = False
    net_d.train()
    if teacher is not None:
        teacher.train(not eman)  # EMAN's teacher always runs in eval mode
    # CPU: the loss is checked every step (no cost); GPU: every 20 steps, so no step waits for the device to finish
    check_every = 1 if fabric.device.type == "cpu" else 20
    finite = torch.ones((), dtype=torch.bool, device=fabric.device)
    cl = torch.channels_last

    @functools.lru_cache(maxsize=2)
    def shard_of(epoch: int) -> torch.Tensor:  # [steps_per_epoch·bs] this rank's image order in `epoch`
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return perm[rank::world][: steps_per_epoch * bs].to(fabric.device)

    def views(k: int) -> tuple[torch.Tensor, torch.Tensor]:  # step k's two views: a function of (seed, k, rank) only
        epoch, it = divmod(k, steps_per_epoch)
        torch.manual_seed(_step_seed(seed, k, rank))
        x = rows(shard_of(epoch)[it * bs: (it + 1) * bs]).float().div_(255)
        return view(x).contiguous(memory_format=cl), view(x).contiguous(memory_format=cl)

    first = True
    with progress or nullcontext():
        # the next step's views are drawn on a worker thread while this step trains (alssl/prefetch.py)
        for _, (x0, x1) in ahead(views, range(step, total), enabled=prefetch, device=fabric.device):
            epoch, it = divmod(step, steps_per_epoch)
            if it == 0 or first:  # a new epoch, or the first step of a resumed one
                loss_sum, std_sum, n_steps = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device), 0
                if it and carry is not None and carry.get("n") == it:  # resumed mid-epoch: the epoch's loss covers all its steps
                    loss_sum, n_steps = carry["loss"].to(fabric.device), it
                    std_sum = torch.tensor(float(carry["std"]), device=fabric.device)
                carry, first = None, False
            m = cosine_schedule(step, total, momentum, 1.0) if momentum_schedule == "cosine" else momentum
            loss, z = _loss(method, net_d, teacher, criterion, x0, x1, fabric)
            finite = finite & torch.isfinite(loss.detach())  # no GPU sync per step: checked every `check_every`
            if (step + 1) % check_every == 0 or it + 1 == steps_per_epoch or \
                    (ckpt_every_steps and (step + 1) % ckpt_every_steps == 0):
                _check_finite(finite, method, step, check_every, ckpt_dir)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            if teacher is not None:
                momentum_update(net.encoder, teacher, m, eman=eman)
            step += 1
            done_here += 1
            loss_sum += loss.detach()
            std_sum += std_of_l2_normalized(z.detach().float())
            n_steps += 1
            if ckpt_every_steps and step % ckpt_every_steps == 0 and it + 1 < steps_per_epoch:
                save()
            if progress is not None:  # the count every step (the ETA), the loss every 5 (`.item()` waits for a GPU)
                progress.update(task, completed=step, **({"loss": f"{loss.item():.3f}"}
                                                         if step % 5 == 0 or step == total else {}))
            if projection is not None:
                projection.step(step)
            _fault_after_steps(done_here)
            if it + 1 == steps_per_epoch:  # end of an epoch: monitor line, checkpoint
                if rank == 0:
                    history.append(monitor(epoch + 1, round(float(loss_sum) / n_steps, 4), round(float(std_sum) / n_steps, 4)))
                    run.log_metrics(history[-1])
                    if progress is not None and history[-1]["knn_accuracy"] is not None:
                        progress.update(task, kNN=f"{history[-1]['knn_accuracy']:.3f}")
                save()
                fabric.barrier()
            if deadline is not None and step < total and _past(deadline, fabric):  # --minutes spent: stop resumably
                if it + 1 < steps_per_epoch:
                    save()
                stopped = True
                break
    seconds = time.perf_counter() - t0
    in_sync = _ranks_in_sync(fabric, net) if world > 1 else None

    if rank != 0:
        return None
    knn = [h["knn_accuracy"] for h in history if h["knn_accuracy"] is not None]  # empty with knn_every=0
    ranks = [h.get("rankme") for h in history if h.get("rankme") is not None]
    meta = {"method": method, "epochs": epochs, "steps": total, "knn_accuracy": knn[-1] if knn else None,
            "eman": eman, "seed": seed, "world_size": world}
    if in_sync is not None:
        meta["ranks_in_sync"] = in_sync
    if stopped:
        meta["stopped_at"] = step
        print(f"# pretrain: the --minutes {minutes:g} budget is spent at step {step} of {total}; the checkpoint is kept "
              f"and backbone.pt holds the weights so far: rerun the same command to go on", file=sys.stderr, flush=True)
    atomic_torch_save(backbone_checkpoint(net.encoder.backbone, name=backbone, in_channels=dataset.channels, **meta),
                      ckpt_dir / "backbone.pt")
    if total == 0:
        save()
    summary = {**meta, "backbone": backbone, "knn_accuracy_init": history[0]["knn_accuracy"], "knn_on": knn_on,
               "rankme": ranks[-1] if ranks else None, "rankme_init": history[0].get("rankme"),
               "loss": history[-1]["loss"], "seconds": round(seconds, 2),
               "images_per_s": round(done_here * bs * world / seconds, 1) if done_here else None}
    if total > 0 and summary["knn_accuracy"] is not None and summary["knn_accuracy_init"] is not None \
            and summary["knn_accuracy"] < summary["knn_accuracy_init"]:
        warn(f"the trained features score {summary['knn_accuracy']:.3f}, below their start "
             f"({summary['knn_accuracy_init']:.3f}; {knn_on}): stage 1 made them worse. Try starting from pretrained "
             f"weights (--init), more --epochs, or the start itself (--epochs 0); `alssl probe`, `query` and `export` "
             f"compare both on your labels and use the stronger")
    return summary


def _past(deadline: float, fabric) -> bool:
    """Whether the wall-clock deadline has passed, decided by rank 0 for every rank (so all ranks stop together)."""
    late = time.perf_counter() > deadline
    if fabric.world_size == 1:
        return late
    return bool(fabric.broadcast(torch.tensor(float(late), device=fabric.device), src=0).item())


def _check_finite(finite: torch.Tensor, method: str, step: int, every: int, ckpt_dir: Path) -> None:
    """Raise (before the next checkpoint could keep bad weights) if a loss since the last check was NaN or inf."""
    if not bool(finite):
        where = f"at step {step}" if every == 1 else f"within the {every} steps up to step {step}"
        raise UserError(f"the {method} loss became NaN or inf {where}; the last good checkpoint is kept in {ckpt_dir}; "
                        f"lower --lr and rerun with a new --out")


@torch.no_grad()
def _ranks_in_sync(fabric, net: nn.Module) -> bool:
    """DDP check: every rank holds bit-identical student weights (all_gather of the flat parameter vector)."""
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = fabric.all_gather(flat)  # [world, P]
    return bool((gathered - gathered[0]).abs().max().item() == 0.0)


def _loss(method: str, net: nn.Module, teacher: nn.Module | None, criterion: nn.Module,
          x0: torch.Tensor, x1: torch.Tensor, fabric) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's loss on two views; also returns the student projections (for the collapse monitor)."""
    if method == "simsiam":  # D(p0, sg(z1))/2 + D(p1, sg(z0))/2
        z0, p0 = net(x0)
        z1, p1 = net(x1)
        return 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach())), z0
    if method == "moco":  # query from view 0, key from view 1 (momentum encoder), queue of past keys
        q, _ = net(x0)
        with torch.no_grad(), fabric.autocast():
            k = teacher(x1)
        return criterion(q, k), q
    with torch.no_grad(), fabric.autocast():  # BYOL: symmetric, online predictions vs target projections
        k0, k1 = teacher(x0), teacher(x1)
    z0, p0 = net(x0)
    z1, p1 = net(x1)
    return 0.5 * (criterion(p0, k1) + criterion(p1, k0)), z0


def load_state(run_path: Path) -> dict:
    """The raw stage-1 training state of a run (weights_only load), for tests and tools."""
    return torch_load(Path(run_path) / "checkpoints" / STATE_FILE)
