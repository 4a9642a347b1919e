"""Stage 1: self-supervised pretraining (SimSiam, MoCo v2, BYOL; EMAN teacher option) in one visible loop.

The methods are objects (alssl/pretrain_methods.py: `METHODS = {"simsiam": SimSiam, "moco": MoCoV2, "byol": BYOL}`)
built from lightly's heads, losses and momentum utilities; Lightning Fabric supplies devices, precision and DDP;
checkpoint checks, metrics truncation, the non-finite message and the --minutes deadline come from alssl/loop.py,
fault injection from alssl/faults.py. `pretrain()` reads setup → resume → loop (`_train`) → finish.

Pixels come through `alssl.data.PoolReader`: a pool that fits (the array SPECs) lives on the training device as one
uint8 tensor, an on-disk pool (an image folder) is read batch by batch; every step takes a batch and draws two kornia
views on it (on a worker thread while the previous step trains: alssl/prefetch.py), so there is no per-image PIL
pipeline and no DataLoader. The random stream of step t on rank r is seeded from
(seed, t, r), which makes a resumed run bit-identical to an uninterrupted one. Checkpoints (`pretrain-state.pt`:
model, teacher, queue, optimizer, scheduler, step) are written atomically every epoch and every `ckpt_every_steps`.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from lightly.utils.debug import std_of_l2_normalized
from torch import nn

from alssl.augment import SSLView, normalise
from alssl.backbones import backbone_checkpoint, build_backbone, load_init_weights
from alssl.data import Dataset, PoolReader
from alssl.errors import UserError, check_positive, check_seed, warn
from alssl.faults import fault_after_steps
from alssl.feature_sets import rankme
from alssl.loop import (fitting, load_checkpoint, non_finite_error, past_deadline, ranks_in_sync, state_problem,
                        truncate_metrics)
from alssl.prefetch import ahead
from alssl.pretrain_methods import METHODS, SSLMethod, SSLNet, momentum_update  # noqa: F401 (re-exported)
from alssl.progress import Projection, progress_bar
from alssl.runs import Run, atomic_torch_save, torch_load

STATE_FILE = "pretrain-state.pt"


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
    out = [backbone(normalise(rows(np.arange(i, min(i + batch_size, len(rows)))).float().div_(255), mean, std))
           .float().cpu()
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


def _fabric(accelerator: str, devices, strategy: str, precision: str, num_nodes: int = 1):
    from lightning_fabric import Fabric

    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        precision=precision)
    except Exception as exc:  # Fabric reports bad device/precision combinations as ValueError / RuntimeError
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot set up --accelerator {accelerator} --devices {devices} --num-nodes {num_nodes} "
                        f"--precision {precision} --strategy {strategy}: {msg}") from None
    return fabric


def check_args(*, method: str, eman: bool, momentum: float, momentum_schedule: str | None, accelerator: str,
               devices, strategy: str, precision: str, seed: int = 0, lr: float | None = None,
               temperature: float = 0.2, num_nodes: int = 1):
    """Validate the stage-1 arguments (before anything is written); returns the configured (unlaunched) Fabric."""
    check_seed(seed)
    if lr is not None:
        check_positive(lr, "--lr")
    check_positive(temperature, "--temperature")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if eman and not METHODS[method].has_teacher:
        with_teacher = " or ".join(f"--method {name}" for name, cls in METHODS.items() if cls.has_teacher)
        raise UserError(f"--eman needs a momentum teacher; use it with {with_teacher}")
    if momentum_schedule not in (None, "cosine"):
        raise UserError(f"unknown momentum schedule {momentum_schedule!r}; use cosine or leave it out")
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"--momentum must be in [0, 1), got {momentum}")
    return _fabric(accelerator, devices, strategy, precision, num_nodes)



# ---------------------------------------------------------------- setup, checkpoint, monitor
@dataclass
class _Setup:
    """What one call trains, built the same way on every rank (weights, heads and MoCo queue from `seed`)."""

    fabric: object
    method: SSLMethod
    net: SSLNet  # the student (its state dict, the teacher update, the kNN monitor)
    net_d: nn.Module  # the same network as Fabric runs it (the DDP wrapper under --devices N)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: PoolReader  # uint8 [B, C, H, W] batches of the pool on the device
    view: SSLView
    bs: int  # images per step on each rank
    steps_per_epoch: int
    total: int
    data_key: list  # [pool size, channels, image size]: what a checkpoint must have been trained on
    state_path: Path

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def n_pool(self) -> int:
        return self.data_key[0]


@dataclass
class _Progress:
    """What a checkpoint carries besides weights: the step, the epoch lines, the open epoch's sums."""

    step: int
    loss_sum: torch.Tensor  # [] sum of this epoch's losses so far (on the device: no sync per step)
    std_sum: torch.Tensor  # [] sum of this epoch's collapse std
    n_steps: int = 0
    history: list = field(default_factory=list)
    carry: dict | None = None  # the partial-epoch sums of a mid-epoch checkpoint, for the first resumed step

    def open_epoch(self, it: int) -> None:
        """Zero the sums at an epoch's start, or continue the checkpoint's sums when resuming at step `it` of it."""
        device = self.loss_sum.device
        self.loss_sum, self.std_sum, self.n_steps = torch.zeros((), device=device), torch.zeros((), device=device), 0
        if it and self.carry is not None and self.carry.get("n") == it:  # the epoch's loss covers all its steps
            self.loss_sum, self.n_steps = self.carry["loss"].to(device), it
            self.std_sum = torch.tensor(float(self.carry["std"]), device=device)
        self.carry = None


def _setup(fabric, dataset: Dataset, run: Run, *, method: SSLMethod, backbone: str, epochs: int, batch_size: int,
           lr: float | None, weight_decay: float, seed: int, init: str | None, hflip: bool | None,
           compile: bool) -> _Setup:
    """Sizes, student, teacher, criterion, optimizer and views; writes `start.pt` on a fresh run."""
    world, state_path = fabric.world_size, run.checkpoints / STATE_FILE
    n_pool = dataset.n_pool
    if run.n_pool != n_pool:
        raise UserError(f"{run.path} was made from a pool of {run.n_pool} images but this data has {n_pool}; "
                        "resume with the original data (see run.toml) or pick a new --out")
    per_rank = n_pool // world
    bs = min(batch_size, per_rank)
    if bs < 2:
        raise UserError(f"the pool has {n_pool} images: too few for {world} device(s); use more data or fewer "
                        "--devices")
    steps_per_epoch = per_rank // bs
    total = epochs * steps_per_epoch

    torch.manual_seed(seed)  # same initial weights (and MoCo queue) on every rank
    net = method.student(build_backbone(backbone, dataset.channels))
    if init is not None:  # after the heads: they draw the same random numbers with or without --init
        load_init_weights(net.encoder.backbone, backbone, init)
    rows = PoolReader(dataset.x_train, fabric.device)
    view = SSLView(dataset.image_size, dataset.channels, dataset.mean, dataset.std, hflip=hflip)
    if method.eman and not state_path.exists():
        _calibrate_bn(net.encoder, rows, view, bs)
    if fabric.global_rank == 0 and total > 0 and not state_path.exists():  # the start, kept as a feature set
        atomic_torch_save(backbone_checkpoint(net.encoder.backbone, name=backbone, in_channels=dataset.channels,
                                              init=init, epochs=0, seed=seed), run.checkpoints / "start.pt")
    method.setup(net, n_pool)  # teacher (after the BN calibration) and criterion (MoCo's queue draws RNG)
    base_lr = lr if lr is not None else method.base_lr * bs * world / 256
    optimizer = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))

    net = net.to(memory_format=torch.channels_last)  # NHWC convolutions: 1.48x faster per step on this CPU
    if compile:
        net.compile()  # in place: the state dict keeps its keys; the kNN monitor's backbone calls stay eager
    net_d, optimizer = fabric.setup(net, optimizer)
    method.to(fabric.device)
    return _Setup(fabric, method, net, net_d, optimizer, scheduler, rows, view.to(fabric.device), bs, steps_per_epoch,
                  total, [n_pool, dataset.channels, dataset.image_size], state_path)


def _saved_problem(saved, method: SSLMethod) -> str | None:
    """What is wrong with a loaded pretrain-state.pt (kind, keys, types), or None."""
    need = {"method": str, "total": int, "step": int, "model": dict, "optimizer": dict, "scheduler": dict,
            "teacher": dict, "history": list}
    if isinstance(saved, dict) and saved.get("method") == method.name:
        need |= method.state_types()  # MoCo: its queue
    problem = state_problem(saved, kind="alssl-pretrain-state", what="an alssl pretraining state", need=need)
    if problem:
        return problem
    if not 0 <= saved["step"] <= saved["total"]:
        return f"step {saved['step']} is outside 0..{saved['total']}"
    if not all(isinstance(h, dict) for h in saved["history"]):
        return "history holds a non-dict entry"
    sums = saved.get("epoch_sums")
    if sums is not None and not (isinstance(sums, dict) and isinstance(sums.get("loss"), torch.Tensor)
                                 and isinstance(sums.get("std"), float) and type(sums.get("n")) is int):
        return "epoch_sums is malformed"
    return None


def _resume(s: _Setup, run: Run) -> _Progress:
    """Load `pretrain-state.pt` when it exists (checked: kind, setup, data, shapes) and forget the metrics lines of the
    steps after it, which are redone."""
    device = s.fabric.device
    p = _Progress(0, torch.zeros((), device=device), torch.zeros((), device=device))
    if s.state_path.exists():
        saved = load_checkpoint(s.state_path, functools.partial(_saved_problem, method=s.method),
                                "delete it to pretrain from scratch, or pick a new --out")
        if saved["method"] != s.method.name or saved["total"] != s.total:
            raise UserError(f"{s.state_path} belongs to another pretraining setup; rerun with the arguments in "
                            f"{run.path / 'run.toml'} or pick a new --out")
        if saved.get("data", s.data_key) != s.data_key:
            raise UserError(f"{s.state_path} was trained on other data (pool, channels, size {saved['data']}, not "
                            f"{s.data_key}); resume with the original data (see run.toml) or pick a new --out")
        with fitting(s.state_path, "this model and data",
                     "resume with the original data and arguments (see run.toml) or pick a new --out"):
            s.net.load_state_dict(saved["model"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.scheduler.load_state_dict(saved["scheduler"])
            s.method.load_state_dict(saved)
        p.step, p.history, p.carry = saved["step"], list(saved["history"]), saved.get("epoch_sums")
    if s.rank == 0:  # no epoch line is doubled; a run with no history keeps none
        truncate_metrics(run.metrics_file, p.step if p.history else -1, stage="pretrain")
    return p


def _save(s: _Setup, p: _Progress) -> None:
    """Write `pretrain-state.pt` atomically (rank 0): weights, optimizer, the method's state, progress."""
    if s.rank != 0:
        return
    extra = s.method.state_dict()  # the teacher first, the method's other keys (MoCo's queue) last, as ever
    state = {"kind": "alssl-pretrain-state", "method": s.method.name, "total": s.total, "step": p.step,
             "data": s.data_key, "model": s.net.state_dict(), "optimizer": s.optimizer.state_dict(),
             "scheduler": s.scheduler.state_dict(), "teacher": extra.pop("teacher"), "history": p.history,
             "epoch_sums": {"loss": p.loss_sum.detach().cpu(), "std": float(p.std_sum), "n": p.n_steps}, **extra}
    atomic_torch_save(state, s.state_path)


class _Monitor:
    """The epoch line: kNN accuracy and RankMe of the student backbone (every `every` epochs and at the end; see
    `score_source`), mean loss, collapse std (with a warning below 0.1/√d), learning rate."""

    def __init__(self, s: _Setup, dataset: Dataset, *, every: int, k: int, t: float):
        self.s, self.dataset, self.every, self.k, self.t = s, dataset, every, k, t
        self.source = score_source(dataset) if every > 0 else None
        device, n_pool = s.fabric.device, dataset.n_pool
        self.test_rows = PoolReader(dataset.x_test, device) if self.source not in (None, RANKME_ONLY) else None
        self.few_rows = None  # a pool without labels is embedded only on 1,024 evenly spaced images, for RankMe
        if self.source not in (None, KNN_POOL):
            self.few_rows = PoolReader(dataset.x_train[np.linspace(0, n_pool - 1, min(n_pool, 1024)).astype(np.int64)],
                                       device)

    def __call__(self, epoch: int, step: int, loss: float | None, collapse: float | None) -> dict:
        ds, acc, rank_me = self.dataset, None, None
        if self.source is not None and (epoch % self.every == 0 or step == self.s.total):
            bb = self.s.net.encoder.backbone
            pool = _embed(bb, self.s.rows if self.source == KNN_POOL else self.few_rows, ds.mean, ds.std)
            rank_me = round(rankme(pool), 2)
            if self.source == KNN_POOL:  # a labeled benchmark: the pool votes for the test images
                acc = knn_accuracy(pool, ds.y_train, _embed(bb, self.test_rows, ds.mean, ds.std), ds.y_test,
                                   num_classes=ds.num_classes, k=self.k, t=self.t)
            elif self.source == KNN_TEST_CV:  # an image folder with --test: folds of the test set vote for each other
                acc = knn_cv_accuracy(_embed(bb, self.test_rows, ds.mean, ds.std), ds.y_test,
                                      num_classes=ds.num_classes, k=min(self.k, 20), t=self.t)
            acc = None if acc is None else round(acc, 4)
        rec = {"stage": "pretrain", "epoch": epoch, "step": step, "loss": loss, "knn_accuracy": acc,
               "rankme": rank_me, "collapse_std": collapse, "lr": self.s.optimizer.param_groups[0]["lr"]}
        if collapse is not None and collapse < 0.1 / math.sqrt(self.s.method.out_dim):  # 1/√d healthy
            warn(f"epoch {epoch}: representation collapse (std of l2-normalised outputs {collapse:.4f})")
        return rec


def _step_views(s: _Setup, seed: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Step k -> its two views [bs, C, H, W]: a function of (seed, k, rank) only, so a resumed run redraws them."""
    rank, world, bs = s.rank, s.fabric.world_size, s.bs

    @functools.lru_cache(maxsize=2)
    def shard_of(epoch: int) -> torch.Tensor:  # [steps_per_epoch·bs] this rank's image order in `epoch`
        perm = torch.randperm(s.n_pool, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return perm[rank::world][: s.steps_per_epoch * bs].to(s.fabric.device)

    def views(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, it = divmod(k, s.steps_per_epoch)
        torch.manual_seed(_step_seed(seed, k, rank))
        x = s.rows(shard_of(epoch)[it * bs: (it + 1) * bs]).float().div_(255)
        cl = torch.channels_last
        return s.view(x).contiguous(memory_format=cl), s.view(x).contiguous(memory_format=cl)

    return views


def _check_finite(finite: torch.Tensor, method: str, step: int, every: int, ckpt_dir: Path) -> None:
    """Raise (before the next checkpoint could keep bad weights) if a loss since the last check was NaN or inf."""
    if not bool(finite):
        where = f"at step {step}" if every == 1 else f"within the {every} steps up to step {step}"
        raise non_finite_error(f"the {method} loss", where, ckpt_dir, fix="lower --lr and rerun with a new --out")


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
    num_nodes: int = 1,
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
    `num_nodes` > 1: the same call on every node (Fabric's num_nodes; NODE_RANK, MASTER_ADDR, MASTER_PORT set); ranks
    are global, so N nodes × M devices draw the seeds and shards one node with N·M devices draws (docs/scale.md).
    `minutes`: a wall-clock budget for this call's training steps; when it is spent the loop stops after the step in
    hand, checkpoints (resumable) and writes `backbone.pt` from the weights so far; the summary says `stopped_at`.
    """
    fabric = check_args(method=method, eman=eman, momentum=momentum, momentum_schedule=momentum_schedule,
                        accelerator=accelerator, devices=devices, strategy=strategy, precision=precision, seed=seed,
                        lr=lr, temperature=temperature, num_nodes=num_nodes)
    fabric.launch()
    ssl = METHODS[method](eman=eman, momentum=momentum, momentum_schedule=momentum_schedule, temperature=temperature,
                          queue_size=queue_size)
    s = _setup(fabric, dataset, run, method=ssl, backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr,
               weight_decay=weight_decay, seed=seed, init=init, hflip=hflip, compile=compile)
    p = _resume(s, run)
    monitor = _Monitor(s, dataset, every=knn_every, k=knn_k, t=knn_t)
    if s.rank == 0 and not p.history:
        p.history.append(monitor(0, p.step, None, None))
        run.log_metrics(p.history[-1])
    t0 = time.perf_counter()
    done_here, stopped = _train(s, p, run, monitor, seed=seed, ckpt_every_steps=ckpt_every_steps, prefetch=prefetch,
                                deadline=None if minutes is None else t0 + 60.0 * minutes,
                                quiet=quiet, title=f"{method} {backbone}")
    seconds = time.perf_counter() - t0
    in_sync = ranks_in_sync(fabric, s.net) if fabric.world_size > 1 else None  # every rank takes part
    if s.rank != 0:
        return None
    if stopped:
        print(f"# pretrain: the --minutes {minutes:g} budget is spent at step {p.step} of {s.total}; the checkpoint is "
              f"kept and backbone.pt holds the weights so far: rerun the same command to go on", file=sys.stderr,
              flush=True)
    return _finish(s, p, dataset, backbone=backbone, epochs=epochs, seed=seed, in_sync=in_sync, stopped=stopped,
                   knn_on=monitor.source, seconds=seconds, done_here=done_here)


def _train(s: _Setup, p: _Progress, run: Run, monitor: _Monitor, *, seed: int, ckpt_every_steps: int,
           prefetch: bool, deadline: float | None, quiet: bool, title: str) -> tuple[int, bool]:
    """The training loop, from step `p.step` to the end (or the deadline). Per step: two views → the method's
    loss → finite check → backward → SGD + cosine lr → teacher update; checkpoints every `ckpt_every_steps` and at
    each epoch's end, with the epoch's monitor line. Returns (steps done in this call, stopped by the deadline)."""
    fabric, method, rank, spe = s.fabric, s.method, s.rank, s.steps_per_epoch
    progress, task = progress_bar(title, s.total, p.step, quiet=quiet or rank != 0, fields={"loss": "-", "kNN": "-"})
    projection = Projection(f"pretrain {title}", s.total, p.step, per_step=s.bs * fabric.world_size,
                            hint="; Ctrl-C and rerun the same command to resume") if rank == 0 else None
    done_here, stopped, first = 0, False, True
    s.net_d.train()
    method.train()
    # CPU: the loss is checked every step (no cost); GPU: every 20 steps, so no step waits for the device to finish
    check_every = 1 if fabric.device.type == "cpu" else 20
    finite = torch.ones((), dtype=torch.bool, device=fabric.device)
    with progress or nullcontext():
        # the next step's views are drawn on a worker thread while this step trains (alssl/prefetch.py)
        for _, (x0, x1) in ahead(_step_views(s, seed), range(p.step, s.total), enabled=prefetch, device=fabric.device):
            epoch, it = divmod(p.step, spe)
            if it == 0 or first:  # a new epoch, or the first step of a resumed one
                p.open_epoch(it)
                first = False
            loss, z = method.loss(s.net_d, x0, x1, fabric.autocast)
            finite = finite & torch.isfinite(loss.detach())  # no GPU sync per step: checked every `check_every`
            if (p.step + 1) % check_every == 0 or it + 1 == spe or \
                    (ckpt_every_steps and (p.step + 1) % ckpt_every_steps == 0):
                _check_finite(finite, method.name, p.step, check_every, s.state_path.parent)
            s.optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            s.optimizer.step()
            s.scheduler.step()
            method.update_teacher(s.net, p.step, s.total)
            p.step += 1
            done_here += 1
            p.loss_sum += loss.detach()
            p.std_sum += std_of_l2_normalized(z.detach().float())
            p.n_steps += 1
            if ckpt_every_steps and p.step % ckpt_every_steps == 0 and it + 1 < spe:
                _save(s, p)
            if progress is not None:  # the count every step (the ETA), the loss every 5 (`.item()` waits for a GPU)
                progress.update(task, completed=p.step, **({"loss": f"{loss.item():.3f}"}
                                                           if p.step % 5 == 0 or p.step == s.total else {}))
            if projection is not None:
                projection.step(p.step)
            fault_after_steps(done_here)
            if it + 1 == spe:  # end of an epoch: monitor line, checkpoint
                if rank == 0:
                    p.history.append(monitor(epoch + 1, p.step, round(float(p.loss_sum) / p.n_steps, 4),
                                             round(float(p.std_sum) / p.n_steps, 4)))
                    run.log_metrics(p.history[-1])
                    if progress is not None and p.history[-1]["knn_accuracy"] is not None:
                        progress.update(task, kNN=f"{p.history[-1]['knn_accuracy']:.3f}")
                _save(s, p)
                fabric.barrier()
            if p.step < s.total and past_deadline(deadline, time.perf_counter(), fabric):  # stop resumably
                if it + 1 < spe:
                    _save(s, p)
                stopped = True
                break
    return done_here, stopped


def _finish(s: _Setup, p: _Progress, dataset: Dataset, *, backbone: str, epochs: int, seed: int, in_sync: bool | None,
            stopped: bool, knn_on: str | None, seconds: float, done_here: int) -> dict:
    """Rank 0: write `backbone.pt` (and the state of an `epochs=0` run) and return the summary."""
    history = p.history
    knn = [h["knn_accuracy"] for h in history if h["knn_accuracy"] is not None]  # empty with knn_every=0
    ranks = [h.get("rankme") for h in history if h.get("rankme") is not None]
    meta = {"method": s.method.name, "epochs": epochs, "steps": s.total, "knn_accuracy": knn[-1] if knn else None,
            "eman": s.method.eman, "seed": seed, "world_size": s.fabric.world_size}
    if in_sync is not None:
        meta["ranks_in_sync"] = in_sync
    if stopped:
        meta["stopped_at"] = p.step
    atomic_torch_save(backbone_checkpoint(s.net.encoder.backbone, name=backbone, in_channels=dataset.channels, **meta),
                      s.state_path.parent / "backbone.pt")
    if s.total == 0:
        _save(s, p)
    summary = {**meta, "backbone": backbone, "knn_accuracy_init": history[0]["knn_accuracy"], "knn_on": knn_on,
               "rankme": ranks[-1] if ranks else None, "rankme_init": history[0].get("rankme"),
               "loss": history[-1]["loss"], "seconds": round(seconds, 2),
               "images_per_s": round(done_here * s.bs * s.fabric.world_size / seconds, 1) if done_here else None}
    if s.total > 0 and summary["knn_accuracy"] is not None and summary["knn_accuracy_init"] is not None \
            and summary["knn_accuracy"] < summary["knn_accuracy_init"]:
        warn(f"the trained features score {summary['knn_accuracy']:.3f}, below their start "
             f"({summary['knn_accuracy_init']:.3f}; {knn_on}): stage 1 made them worse. Try starting from pretrained "
             f"weights (--init), more --epochs, or the start itself (--epochs 0); `alssl probe`, `query` and `export` "
             f"compare both on your labels and use the stronger")
    return summary


def load_state(run_path: Path) -> dict:
    """The raw stage-1 training state of a run (weights_only load), for tests and tools."""
    return torch_load(Path(run_path) / "checkpoints" / STATE_FILE)
